"""Every option of a run, declared once: its flag, default, help, bounds or choices, and where it appears.

The same declaration makes the ``agentperf capacity`` and ``agentperf truth`` arguments, Locust's custom
arguments (web UI start form, ``LOCUST_<NAME>`` variables, ``locust.conf``), the arguments ``agentperf
capacity`` forwards to its Locust master (:func:`forward`, so no option can be forgotten on the way), and
the one validation of a value (:func:`value`: the command line, a conf file and the web UI's strings all go
through it). Stages build their frozen settings (``ReplaySettings``, ``AgentSettings``,
``SearchParameters``) from :func:`value`, so a bad value is one line naming the option, wherever it came from.

A leaf: it imports nothing of agentperf's but the error type, so every stage may read it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from agentperf_users.bounded import short
from agentperf_users.errors import AgentperfError

TRAJECTORY_FORMATS = ("auto", "aa", "mooncake", "agentperf")
TOOL_WAIT_MODES = ("recorded", "sampled", "none")
NAMESPACE_MODES = ("on-wrap", "per-run", "per-session")
START_TURN_MODES = ("random", "first")
RECHECK_MODES = ("auto", "on", "off")
MAX_AGENTS = 100_000
MAX_STEP_SECONDS = 86_400.0  # a day: past that a number is a typo
MAX_TIMEOUT_S = 86_400.0  # and a timer that long never fires in a test
MAX_WINDOW_FACTOR = 4.0  # how far --min-requests may extend a window
MAX_TOOL_WAIT_S = 86_400.0
MAX_TOOL_WAIT_SIGMA = 10.0  # e^10 times the median at one sigma: already no tool wait a trajectory holds
MAX_SEED = 2**63  # what every random generator in the replay takes without surprise
MAX_REPEATS = 100  # searches of one prediction (predict --repeats, capacity --predict-repeats): minutes at most
MAX_SPEED_SPREAD = 1.0  # sigma of a server's log speed: 1 already spans 4.6x slower to 4.6x faster over 8 searches
_MAX_NUMBER_CHARS = 40  # a web UI string longer than this is not a number anyone meant


class Group(str, Enum):
    """Who reads an option; a command adds the groups it uses, ``agentperf capacity`` forwards its own."""

    WORKLOAD = "workload"  # which trajectories
    AGENT = "agent"  # how an agent talks to the server
    REPLAY = "replay"  # how trajectories are replayed: the rules the ground truth shares with the agents
    SLO = "slo"  # the tiers records are judged on, by the search and live
    RUN = "run"  # where records go, and the run's id (``agentperf capacity`` sets them itself)
    METRICS = "metrics"  # the master's Prometheus endpoint
    SEARCH = "search"  # the capacity search
    PREDICT = "predict"  # the prediction a live capacity search starts from (not the ground truth's own search)
    SEARCH_FILES = "search-files"  # a search's run folder and console (``agentperf capacity`` sets them itself)


@dataclass(frozen=True)
class Option:
    """One option. Its type is its default's; a bool is a ``--x/--no-x`` pair. ``low``/``high`` bound a
    number (``low_open``: the bound itself is not allowed); ``choices`` list a string's values."""

    flag: str
    group: Group
    default: bool | int | float | str
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    web_ui: bool = True  # shown in Locust's start form (never for what picks a secret or opens a port)

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def kind(self) -> type:
        return type(self.default)


def _number(flag: str, group: Group, default: int | float, help: str, low: float, high: float,
            low_open: bool = False, web_ui: bool = True) -> Option:
    return Option(flag, group, default, help, low=low, high=high, low_open=low_open, web_ui=web_ui)


OPTIONS: tuple[Option, ...] = (
    Option("--trajectories", Group.WORKLOAD, "default", "trajectory file, folder, manifest or bundled set name"),
    Option("--trajectory-format", Group.WORKLOAD, "auto", "trajectory format (auto: sniffed)",
           choices=TRAJECTORY_FORMATS),
    Option("--model", Group.AGENT, "", "model to request; empty: the first of the server's /v1/models"),
    Option("--api-key-env", Group.AGENT, "OPENAI_API_KEY", "name of the environment variable that holds the API "
           "key (sent as a Bearer token); fixed when the process starts", web_ui=False),
    _number("--request-timeout", Group.AGENT, 600.0, "seconds a request may take in all: its response, first token "
            "and whole stream", 0.0, MAX_TIMEOUT_S, low_open=True),
    _number("--stall-timeout", Group.AGENT, 120.0, "seconds a stream may stay silent once its first token arrived",
            0.0, MAX_TIMEOUT_S, low_open=True),
    Option("--ignore-eos", Group.REPLAY, True, "send ignore_eos, so that each turn generates exactly its target "
           "output tokens"),
    Option("--tool-wait", Group.REPLAY, "recorded", "pause after each turn: the recorded tool time, a seeded "
           "lognormal sample, or none", choices=TOOL_WAIT_MODES),
    _number("--tool-wait-median", Group.REPLAY, 1.0, "median of a sampled tool wait, seconds", 0.0, MAX_TOOL_WAIT_S,
            low_open=True),
    _number("--tool-wait-sigma", Group.REPLAY, 1.0, "lognormal sigma of a sampled tool wait", 0.0,
            MAX_TOOL_WAIT_SIGMA),
    Option("--cache-namespace", Group.REPLAY, "on-wrap", "prefix-cache isolation marker on the first user message, "
           "from the second pass over the set on (on-wrap), per run and pass (per-run), or per session "
           "(per-session)", choices=NAMESPACE_MODES),
    _number("--seed", Group.REPLAY, 0, "seed of the sampled tool waits and the random start turns", -(MAX_SEED - 1),
            MAX_SEED - 1),
    Option("--start-turn", Group.REPLAY, "random", "where an agent's first trajectory starts: a seeded random turn "
           "(steady state from the start), or turn 0; later trajectories always start at turn 0",
           choices=START_TURN_MODES),
    Option("--tools", Group.REPLAY, True, "send each trajectory's tool definitions with its requests (--no-tools: "
           "for a server without tool calling, e.g. vLLM started without --enable-auto-tool-choice; prompts are "
           "then smaller)"),
    Option("--records-dir", Group.RUN, "", "folder for the per-process record files; empty: none"),
    Option("--run-id", Group.RUN, "", "id stamped on every record; empty: the master makes one"),
    Option("--probe", Group.RUN, True, "send the qualification probe (one short request of the run's shape) before "
           "the agents start; a server that cannot serve the run stops it (agentperf capacity probes first itself)"),
    Option("--slo", Group.SLO, "", "SLO tiers YAML file, or a bundled preset (default, aa-agentperf); empty: "
           "default"),
    _number("--slo-window-s", Group.SLO, 60.0, "the SLO now verdict (web UI tab, metrics) judges the requests "
            "that ended in this many last seconds", 0.0, MAX_STEP_SECONDS, low_open=True),
    _number("--metrics-port", Group.METRICS, 0, "serve Prometheus metrics on this port of the master; 0: none",
            0, 65_535, web_ui=False),
    Option("--server-metrics-url", Group.METRICS, "", "the serving engine's Prometheus endpoint (vLLM or SGLang "
           "names), read every second for each step's server numbers and the diagnosis of a failing step; empty: "
           "the target's /metrics", web_ui=False),
    Option("--metrics-host", Group.METRICS, "127.0.0.1", "address the metrics listen on (0.0.0.0: every "
           "interface, for a Prometheus on another host)", web_ui=False),
    _number("--start-agents", Group.SEARCH, 1, "agents in the first load step", 1, MAX_AGENTS),
    _number("--step-agents", Group.SEARCH, 0, "agents added per step; 0: multiply by --step-factor", 0, MAX_AGENTS),
    _number("--step-factor", Group.SEARCH, 2.0, "agent multiplier per step when --step-agents is 0", 0.0, 1000.0,
            low_open=True),
    _number("--max-agents", Group.SEARCH, 256, "never run more agents than this", 1, MAX_AGENTS),
    _number("--resolution-agents", Group.SEARCH, 1, "bisect until pass and fail are this close", 1, MAX_AGENTS),
    _number("--agent-spawn-rate", Group.SEARCH, 10.0, "agents started (or stopped) per second", 0.0, 10_000.0,
            low_open=True),
    _number("--warmup-s", Group.SEARCH, 30.0, "seconds after each ramp that are not judged", 0.0, MAX_STEP_SECONDS),
    _number("--window-s", Group.SEARCH, 90.0, "seconds judged per load step", 0.0, MAX_STEP_SECONDS, low_open=True),
    _number("--min-requests", Group.SEARCH, 1, f"a window is extended (up to {MAX_WINDOW_FACTOR:g}x --window-s) "
            "until this many requests ended in it", 0, 10_000_000),
    Option("--early-stop", Group.SEARCH, True, "end a window early once its verdict cannot change (--no-early-stop: "
           "always measure the whole window)"),
    Option("--restart-agents", Group.SEARCH, True, "stop every agent between load steps, so no step inherits the "
           "queue of the one before"),
    Option("--guided-search", Group.SEARCH, True, "pick the next agent count from the SLO margins measured so far "
           "(interpolation), not only by doubling and bisecting"),
    Option("--recheck", Group.SEARCH, "auto", "once the tiers are located, measure the first tier's capacity and "
           "first failing count once more: the report states how far the server's speed moved between the two and "
           "widens the rerun spread where they disagree (two steps more). auto: on against a server, off against "
           "agentperf capacity's embedded simulator and the ground truth, whose speed does not drift",
           choices=RECHECK_MODES),
    Option("--predict", Group.PREDICT, "", "simulator profile of a calibrated twin (agentperf calibrate), name or "
           "YAML: start the search at the capacity per tier it predicts (agentperf predict), verified and widened "
           "where wrong; empty: step up from --start-agents", web_ui=False),
    _number("--predict-repeats", Group.PREDICT, 1, "searches of the --predict twin at seeds --seed, --seed + 1, ...: "
            "the search starts from their median per tier and steers by their mean margins (agentperf predict "
            "--repeats)", 1, MAX_REPEATS, web_ui=False),
    _number("--predict-speed-spread", Group.PREDICT, 0.0, "with --predict-repeats: how much the server's speed moves "
            "between measurements (the sigma of its log, e.g. 0.1; agentperf calibrate --from-run suggests one): the "
            "twin's searches run on its profile slowed or sped by evenly spaced quantiles, so the range the report "
            "gives includes that drift (agentperf predict --speed-spread)", 0.0, MAX_SPEED_SPREAD, web_ui=False),
    Option("--capacity-json", Group.SEARCH_FILES, "", "write the search's state (steps, capacity) to this file, whole, "
           "after every judged step"),
    Option("--progress-events", Group.SEARCH_FILES, False, "log the search's progress as events for agentperf "
           "capacity's console (a live line per step)", web_ui=False),
    Option("--server-metrics-file", Group.SEARCH_FILES, "", "the server's metrics per second (JSONL, written by "
           "agentperf capacity's reader), for each step's server numbers and diagnosis", web_ui=False),
)
BY_DEST = {option.dest: option for option in OPTIONS}
assert len(BY_DEST) == len(OPTIONS), "an option declared twice"


def in_groups(groups: Iterable[Group]) -> list[Option]:
    wanted = set(groups)
    return [option for option in OPTIONS if option.group in wanted]


def add_options(parser: Any, groups: Iterable[Group], *, locust: bool = False) -> None:
    """Add the groups' options to an argparse parser, or (``locust``) to Locust's: on the parser itself, not a
    group (only then does Locust's web UI show them), with ``LOCUST_<NAME>`` variables and ``agentperf:`` in
    their help."""
    for option in in_groups(groups):
        extra: dict[str, Any] = {}
        if locust:
            extra = {"env_var": "LOCUST_" + option.dest.upper(), "include_in_web_ui": option.web_ui}
        if isinstance(option.default, bool):
            extra["action"] = argparse.BooleanOptionalAction
        else:
            extra["type"] = option.kind
        if option.choices:
            extra["choices"] = option.choices
        parser.add_argument(option.flag, default=option.default, help=("agentperf: " if locust else "") + option.help,
                            **extra)


def forward(namespace: argparse.Namespace, groups: Iterable[Group]) -> list[str]:
    """The command-line arguments that give another process the same values of the groups' options."""
    arguments = []
    for option in in_groups(groups):
        given = getattr(namespace, option.dest)
        if isinstance(option.default, bool):
            arguments.append(option.flag if given else "--no-" + option.flag[2:])
        else:
            arguments += [option.flag, str(given)]
    return arguments


def value(namespace: Any, dest: str) -> Any:
    """Option ``dest`` from parsed options, checked against its declaration: a number of its type within its
    bounds (a web UI string is converted, NaN and infinities fail), a string among its choices. Anything else
    is one line naming the option and what was expected."""
    option = BY_DEST[dest]
    given = getattr(namespace, dest, option.default)
    if isinstance(option.default, bool):
        if isinstance(given, str):  # the web UI's checkbox, or an environment variable
            return given.strip().lower() in ("1", "true", "yes", "on")
        return bool(given)
    if isinstance(option.default, (int, float)):
        return _bounded_number(option, given)
    text = "" if given is None else str(given)
    if option.choices and text not in option.choices:
        raise AgentperfError(f"{option.flag} {short(given)}: expected one of {', '.join(option.choices)}")
    return text


def _bounded_number(option: Option, given: Any) -> int | float:
    kind = option.kind
    number = None
    if isinstance(given, str) and len(given) <= _MAX_NUMBER_CHARS:
        try:
            number = kind(given.strip())
        except ValueError:
            number = None
    elif isinstance(given, (int, float)) and not isinstance(given, bool) and (kind is float or isinstance(given, int)):
        number = kind(given)
    low, high = option.low, option.high
    if number is not None and not (isinstance(number, float) and math.isnan(number)):
        if (low is None or (low < number if option.low_open else low <= number)) and (high is None or number <= high):
            return number
    noun = "an integer" if kind is int else "a number"
    bounds = [f"{'>' if option.low_open else '>='} {low:g}" if low is not None else "",
              f"at most {high:g}" if high is not None else ""]
    raise AgentperfError(f"{option.flag}: expected {noun} {', '.join(b for b in bounds if b)}, got {short(given)}")

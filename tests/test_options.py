"""Every option is declared once (``agentperf_users.options``) and is the same wherever it appears: the
``agentperf capacity`` and ``truth`` arguments, Locust's custom arguments, ``locust.conf``, and the
arguments ``agentperf capacity`` hands its master."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from locust import argument_parser

from agentperf_users import options
from agentperf_users.cli import capacity
from agentperf_users.cli.main import build_parser
from agentperf_users.errors import AgentperfError
from agentperf_users.options import OPTIONS, Group
from agentperf_users.workload.readers import FORMATS, READERS
from tests.support import install_agentperf

REPO = Path(__file__).resolve().parent.parent
NON_DEFAULT = {bool: lambda o: not o.default, int: lambda o: int(o.low or 0) + 2, float: lambda o: (o.low or 0) + 2.5,
               str: lambda o: o.choices[-1] if o.choices else "x-" + o.dest}


def _subcommand(name: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


def _actions(parser) -> dict[str, object]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def _locust_actions() -> dict[str, object]:
    install_agentperf()
    return _actions(argument_parser.get_parser())


def test_each_option_has_one_default_and_help_everywhere_it_appears():
    everywhere = {"capacity": _actions(_subcommand("capacity")), "truth": _actions(_subcommand("truth")),
                  "locust": _locust_actions()}
    for option in OPTIONS:
        seen = {where: actions[option.dest] for where, actions in everywhere.items() if option.dest in actions}
        assert "locust" in seen, option.flag  # every option of a run can be given to a plain Locust run
        for where, action in seen.items():
            assert action.default == option.default, (option.flag, where)
            assert action.help.removeprefix("agentperf: ") == option.help, (option.flag, where)
            assert tuple(action.choices or ()) == option.choices, (option.flag, where)


def test_locust_conf_lists_every_option_with_its_default():
    conf = (REPO / "locust.conf").read_text()
    for option in OPTIONS:
        shown = "" if option.default == "" else str(option.default).lower() if isinstance(option.default, bool) \
            else str(option.default)
        pattern = rf"^# {re.escape(option.flag[2:])} = {re.escape(shown)}(?:\s|$)" if shown \
            else rf"^# {re.escape(option.flag[2:])} =\s*$"
        assert re.search(pattern, conf, re.M), f"locust.conf: {option.flag[2:]} = {shown}"


def test_capacity_hands_its_master_every_option_it_takes():
    """Not-default values for every forwarded option, parsed back by Locust's own parser, are the same:
    an option added to the table cannot run at Locust's default by being forgotten on the way."""
    forwarded = options.in_groups(capacity.FORWARDED_GROUPS)
    argv = []
    for option in forwarded:
        value = NON_DEFAULT[option.kind](option)
        argv += [option.flag if value else "--no-" + option.flag[2:]] if option.kind is bool else [option.flag, str(value)]
    args = build_parser().parse_args(["capacity", *argv])
    command = capacity._locust_command(args, "http://127.0.0.1:9", Path("/tmp/run"), args.model)
    install_agentperf()
    parsed = argument_parser.get_parser().parse_args(command[command.index("--headless"):])
    for option in forwarded:
        assert getattr(parsed, option.dest) == getattr(args, option.dest) != option.default, option.flag


def test_no_module_declares_an_option_of_the_table_again():
    declared = {option.flag for option in OPTIONS}
    again = []
    for path in (REPO / "agentperf_users").rglob("*.py"):
        if "simulator" in path.parts:  # the sibling's own options (its --seed is another seed)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in declared:
                again.append(f"{path.relative_to(REPO)}: {node.args[0].value}")
    assert again == []


def test_the_trajectory_formats_are_the_readers():
    assert FORMATS == ("auto", *READERS)


@pytest.mark.parametrize(("dest", "given", "expected"), [
    ("early_stop", "false", False), ("tools", "True", True), ("window_s", " 12.5 ", 12.5), ("seed", "7", 7),
    ("tool_wait", "none", "none"),
])
def test_the_web_uis_strings_are_read_as_their_options_type(dest, given, expected):
    import argparse

    assert options.value(argparse.Namespace(**{dest: given}), dest) == expected


@pytest.mark.parametrize(("dest", "given", "message"), [
    ("window_s", "nan", "--window-s: expected a number > 0, at most 86400, got 'nan'"),
    ("start_agents", "1.5", "--start-agents: expected an integer >= 1, at most 100000, got '1.5'"),
    ("metrics_port", 70000, "--metrics-port: expected an integer >= 0, at most 65535, got 70000"),
    ("cache_namespace", "x", "--cache-namespace 'x': expected one of on-wrap, per-run, per-session"),
])
def test_a_bad_value_is_one_line_naming_the_option(dest, given, message):
    import argparse

    with pytest.raises(AgentperfError) as raised:
        options.value(argparse.Namespace(**{dest: given}), dest)
    assert str(raised.value) == message


def test_groups_partition_the_table():
    assert {option.group for option in OPTIONS} == set(Group)


@pytest.mark.parametrize(("argv", "said"), [
    (["capacity", "--window-s", "wide"], "agentperf capacity: error: argument --window-s: invalid float value: 'wide'"),
    (["predict", "--repeats", "3"], "agentperf predict: error: the following arguments are required: --profile"),
    (["trajectories", "synth", "--count", "x"], "agentperf trajectories synth: error: argument --count"),
])
def test_a_mistyped_command_line_is_one_line_without_the_usage(argv, said, capsys):
    """argparse's own errors (a number that is not one, a missing required option) are one line naming the
    option, as agentperf's are, not the forty-line usage before it; exit 2."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and err[0].startswith(said), err
    assert err[0].endswith(f"(see agentperf {' '.join(argv[:2 if argv[0] == 'trajectories' else 1])} --help)")


def test_options_neither_agentperf_nor_locust_knows_are_one_line_before_anything_starts(tmp_path):
    """``agentperf capacity`` hands Locust what it does not know itself: Locust's parser reads those first, so a
    typo ends at once (exit 2, one line naming it, no run folder) instead of after qualification and the
    ground truth."""
    done = subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--stop-timeout", "3",
                           "--nope", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "agentperf: error: unrecognized arguments (neither agentperf's nor Locust's): --nope"], done.stderr
    assert not (tmp_path / "run").exists() and "run folder" not in done.stdout
    capacity.check_locust_args(["--loglevel", "DEBUG", "--stop-timeout", "3"])  # Locust's: no error
    with pytest.raises(AgentperfError) as raised:  # the option is named, never a value given with it
        capacity.check_locust_args(["--api-key", "sk-canary-1234567890", "--token=sk-canary-0987654321"])
    assert str(raised.value) == "unrecognized arguments (neither agentperf's nor Locust's): --api-key --token"
    for given, said in ((["--stop-timeout", "3", "--nope"], "unrecognized arguments (neither agentperf's nor "
                         "Locust's): --nope"), (["--loglevel"], "argument --loglevel/-L: expected one argument")):
        with pytest.raises(AgentperfError) as raised:
            capacity.check_locust_args(given)
        assert str(raised.value) == said

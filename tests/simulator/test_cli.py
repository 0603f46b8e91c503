"""``agentperf simulate`` / ``python -m agentperf_users.simulator`` as real processes: errors are one line."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from agentperf_users.simulator import cli
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    SimulatorError,
    load_profile,
)
from tests.simulator import write_profile


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentperf_users.simulator", *args],
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_profile_is_a_one_line_error():
    assert_one_line_error(simulate("--profile", "no-such-profile", "--port", "0"), "no-such-profile", DEFAULT_PROFILE)


def test_malformed_profile_file_is_a_one_line_error_naming_file_and_field(tmp_path):
    path = write_profile(tmp_path, {"gpu.count": "two"})
    assert_one_line_error(simulate("--profile", str(path), "--port", "0"), str(path), "gpu.count")


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(simulate("--port", str(port)), "cannot listen", str(port))


def test_describe_prints_capacity_numbers_as_text_and_json():
    expected = load_profile().describe()
    text = simulate("--describe")
    assert text.returncode == 0
    assert f"{expected['kv_capacity_tokens']:,} tokens" in text.stdout
    assert str(expected["decode_step_b64_ms"]) in text.stdout and "W idle" in text.stdout
    as_json = simulate("--describe", "--json")
    assert json.loads(as_json.stdout) == expected
    listed = simulate("--list-profiles")
    assert DEFAULT_PROFILE in listed.stdout.split()


def test_describe_names_its_profile():
    """``--describe PROFILE`` (as a capacity planner types it) describes that profile, not the default."""
    other = load_profile("l4-llama3.2-3b").describe()
    named = simulate("--describe", "l4-llama3.2-3b", "--json")
    assert named.returncode == 0 and json.loads(named.stdout) == other
    assert_one_line_error(simulate("--describe", "no-such-gpu"), "no-such-gpu")


def test_registers_as_an_agentperf_subcommand():
    parser = argparse.ArgumentParser(prog="agentperf")
    cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--port", "0", "--served-model-name", "a", "b", "--seed", "3"])
    assert args.func is cli.run and args.port == 0 and args.served_model_name == ["a", "b"] and args.seed == 3
    args = parser.parse_args(["simulate", "--reasoning-share", "1.5"])
    assert args.func(args) == cli.EXIT_ERROR  # validated in run(), reported as one line


def test_child_process_reports_its_port_and_serves():
    with cli.SimulatorProcess(["--port", "0", "--served-model-name", "sim-model"]) as sim:
        models = json.load(urllib.request.urlopen(sim.url + "/v1/models", timeout=10))
        assert [m["id"] for m in models["data"]] == ["sim-model"]
        process = sim.process
    assert process.poll() is not None  # stopped on exit


def test_child_process_that_cannot_start_raises_a_simulator_error():
    with pytest.raises(SimulatorError, match="did not start"):
        with cli.SimulatorProcess(["--profile", "no-such-profile", "--port", "0"]):
            pass

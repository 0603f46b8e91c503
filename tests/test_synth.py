"""Synthetic trajectories: requested statistics, determinism, the CLI, and the bundled sets' README."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from agentperf_users.errors import AgentperfError
from agentperf_users.workload import synth
from agentperf_users.workload.readers import load_trajectories
from agentperf_users.workload.synth import (
    SynthParams,
    format_stats,
    percentile,
    set_stats,
    synthesize,
    write_set,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "trajectories" / "README.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentperf")
    synth.register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def _stats_of(params: SynthParams, tmp_path: Path) -> dict:
    path = tmp_path / f"{params.name}.jsonl"
    write_set(path, *synthesize(params))
    return set_stats(load_trajectories(str(path)))


def test_default_parameters_give_aa_statistics(tmp_path):
    stats = _stats_of(SynthParams(count=200, seed=11, name="aa"), tmp_path)
    inputs, outputs = stats["input_tokens"], stats["output_tokens"]
    assert 27_000 * 0.85 <= inputs["mean"] <= 27_000 * 1.15
    assert 5_000 * 0.85 <= inputs["p5"] <= 5_000 * 1.15
    assert inputs["max"] <= 131_072
    assert 150 * 0.9 <= outputs["p50"] <= 150 * 1.1
    assert 2_000 * 0.85 <= outputs["p95"] <= 2_000 * 1.1
    assert 0.9 <= stats["tool_wait_s"]["p50"] <= 1.1
    assert stats["turns"]["max"] <= 200


def test_requested_statistics_are_met(tmp_path):
    params = SynthParams(count=150, seed=3, name="custom", max_context=32_768, output_median=300, output_p95=1_200,
                         output_max=4_000, tool_wait_median_s=2.0, tool_wait_sigma=0.5, min_turns=4, max_turns=30)
    stats = _stats_of(params, tmp_path)
    assert 300 * 0.9 <= stats["output_tokens"]["p50"] <= 300 * 1.1
    assert 1_200 * 0.85 <= stats["output_tokens"]["p95"] <= 1_200 * 1.15
    assert stats["output_tokens"]["max"] <= 4_000
    assert 2.0 * 0.9 <= stats["tool_wait_s"]["p50"] <= 2.0 * 1.1
    assert stats["input_tokens"]["max"] + stats["output_tokens"]["max"] > 32_768 * 0.5  # the cap is reached...
    trajectories = load_trajectories(str(tmp_path / "custom.jsonl"))
    for index in range(len(trajectories)):
        shapes = trajectories.shapes(index)
        assert all(s.prompt_tokens + s.output_tokens <= 32_768 for s in shapes)  # ...and never passed
        assert len(shapes) <= 30
        assert shapes[-1].tool_wait_s == 0.0


def test_synthesis_is_deterministic_and_prefix_stable():
    params = SynthParams(count=12, seed=5, name="d")
    assert synthesize(params) == synthesize(params)
    assert synthesize(replace(params, count=5))[1] == synthesize(params)[1][:5]
    assert synthesize(params)[1] != synthesize(replace(params, seed=6))[1]


def test_system_prompt_and_tools_are_shared_across_trajectories(tmp_path):
    path = tmp_path / "s.jsonl"
    write_set(path, *synthesize(SynthParams(count=3, seed=1, name="s", tool_count=4)))
    trajectories = load_trajectories(str(path))
    first_turns = [trajectories.trajectory(i).turns[0] for i in range(3)]
    assert len({t.messages[0]["content"] for t in first_turns}) == 1  # system prompt
    assert len({t.messages[1]["content"] for t in first_turns}) == 3  # tasks differ
    assert all(t.tools is first_turns[0].tools and len(t.tools) == 4 for t in first_turns)


def test_yaml_output_loads_like_jsonl(tmp_path):
    header, trajectories = synthesize(SynthParams(count=4, seed=2, name="y"))
    write_set(tmp_path / "y.yaml", header, trajectories)
    write_set(tmp_path / "y.jsonl", header, trajectories)
    from_yaml, from_jsonl = (load_trajectories(str(tmp_path / name)) for name in ("y.yaml", "y.jsonl"))
    assert [from_yaml.shapes(i) for i in range(4)] == [from_jsonl.shapes(i) for i in range(4)]
    assert from_yaml.trajectory(2).turns[-1].messages == from_jsonl.trajectory(2).turns[-1].messages


def test_cli_synth_and_stats(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    assert _run("trajectories", "synth", "--count", "6", "--seed", "9", "--output-median", "80", "--out", str(out)) == 0
    assert re.match(r"wrote 6 trajectories \(\d+ turns\) to ", capsys.readouterr().out)
    header = json.loads(out.read_text().splitlines()[0])
    assert header["name"] == "cli" and header["generator"]["parameters"]["output_median"] == 80
    assert _run("trajectories", "stats", str(out), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == set_stats(load_trajectories(str(out)))
    assert printed["trajectories"] == 6


@pytest.mark.parametrize("flags, message", [
    (("--output-median", "500", "--output-p95", "200"), r"need --output-min <= --output-median <= --output-p95"),
    (("--count", "0"), r"--count must be > 0, got 0"),
    (("--tool-wait-median-s", "0"), r"--tool-wait-median-s must be > 0, got 0.0"),
    (("--task-sigma", "-1"), r"--task-sigma must be >= 0, got -1.0"),
    (("--tool-count", "99"), r"--tool-count must be at most 8, got 99"),
    (("--max-context", "1000"), r"--max-context 1000 leaves no room for a first turn"),
])
def test_cli_rejects_bad_parameters_in_one_line(tmp_path, flags, message):
    with pytest.raises(AgentperfError, match=message):
        _run("trajectories", "synth", "--out", str(tmp_path / "x.jsonl"), *flags)
    assert not (tmp_path / "x.jsonl").exists()


def test_percentile_interpolates_between_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 95) == 10
    assert percentile([0, 10], 95) == pytest.approx(9.5)


def _readme_blocks() -> list[str]:
    return re.findall(r"```\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("name", ("default", "demo"))
def test_bundled_set_is_what_its_readme_command_writes(tmp_path, name):
    commands = [b.strip() for b in _readme_blocks() if b.startswith("agentperf trajectories synth") and f"--name {name} " in b]
    assert len(commands) == 1
    argv = shlex.split(commands[0])[1:]
    bundled = ROOT / argv[argv.index("--out") + 1]
    argv[argv.index("--out") + 1] = str(tmp_path / bundled.name)
    assert _run(*argv) == 0
    assert (tmp_path / bundled.name).read_bytes() == bundled.read_bytes()


@pytest.mark.parametrize("name", ("default", "demo"))
def test_bundled_set_statistics_are_what_the_readme_says(name):
    assert format_stats(set_stats(load_trajectories(name))) + "\n" in _readme_blocks()

"""Every malformed input fails with exit 2 and one line naming the file and what was expected.

The corpus under ``tests/malformed/`` (made by ``tests/malformed/generate.py``) breaks trajectory files
of every format, manifests, SLO files and simulator profiles one way each. Most cases run in-process
(the loaders raise the error the command line prints); a few of each entry point run as the real
command, all at once, under a 2 GiB address-space limit and a timeout, to show the exit code, the
single stderr line, no traceback, and bounded time and memory. Inputs too big to commit (a gzip bomb,
an over-long line, an oversized YAML file) are made here.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from agentperf_users.bounded import MAX_DEPTH, InputError, loads_json
from agentperf_users.errors import AgentperfError
from agentperf_users.measure.slo import load_slo
from agentperf_users.options import Group, add_options
from agentperf_users.search.policy import SearchParameters
from agentperf_users.simulator.profile import ProfileError, load_profile
from agentperf_users.workload.readers import MANIFEST_OUTSIDE_ENV, load_trajectories
from agentperf_users.workload.readers import common as readers_common
from agentperf_users.workload.readers import compact as compact_reader

CORPUS = Path(__file__).resolve().parent / "malformed"
HELPERS = {"generate.py", "manifests/outside.jsonl"}
"""Files of the corpus folder that are not cases: the generator, and a valid file outside the
manifests' folders that a manifest must not reach."""
MEMORY_LIMIT_BYTES = 2 * 1024**3
COMMAND_TIMEOUT_S = 120  # generous: each case takes a second or two of CPU

_LIMIT = r"at most 1,000,000"
_ROLES = r"role must be one of system, developer, user, assistant, tool, got "
_CONTENT = r"must be a string or a list of content parts, got "
_PART = r"must be a content part \(an object with a string type\), got "
_ID = r"must be a non-empty string of one printable line, at most 256 characters, got "
_BOMB = r"more than [\d,]+ values once its aliases \(\*name\) are expanded; expected a document without an alias bomb"
_DEEP = r"nested more than 64 levels deep"
_HUGE_INT = r"an integer of more than 4,300 digits; expected a number of sensible size"
_OUTSIDE = r"is outside the manifest's folder .*; expected a path inside it \(or set AGENTPERF_MANIFEST_OUTSIDE=1"
_NAME = r"name: expected a non-empty single line of printable text, at most 100 characters, got "
_TTFT = r"tiers\[0\]\.ttft_max_s: expected a positive number of seconds, at most 86400, got "
_PROFILE_YAML = r"expected valid YAML of a profile: "

EXPECTED: dict[str, str] = {
    # AA traces: where is "<file>:<line>: "
    "trajectories/aa-int-5000-digits.jsonl": r":1: " + _HUGE_INT,
    "trajectories/aa-output-tokens-20-digits.jsonl": r":1: target_output_tokens must be a positive integer " + _LIMIT,
    "trajectories/aa-output-tokens-float.jsonl": r":1: target_output_tokens must be a positive integer " + _LIMIT + ", got 1e\\+22",
    "trajectories/aa-deep-nesting.jsonl": r":1: " + _DEEP,
    "trajectories/aa-tool-calls-not-list.jsonl": r":1: messages\[0\]\.tool_calls must be a list of tool calls, got 7",
    "trajectories/aa-tool-calls-item-string.jsonl": r":1: messages\[0\]\.tool_calls\[0\] must be an object \(an OpenAI tool call\)",
    "trajectories/aa-tool-call-function-string.jsonl":
        r":1: messages\[0\]\.tool_calls\[0\]\.function must be an object with a string name and string arguments, got \"run\"",
    "trajectories/aa-tool-call-arguments-object.jsonl":
        r":1: messages\[0\]\.tool_calls\[0\]\.function must be an object with a string name and string arguments",
    "trajectories/aa-content-integer.jsonl": r":1: messages\[0\]\.content " + _CONTENT + "5$",
    "trajectories/aa-content-object.jsonl": r":1: messages\[0\]\.content " + _CONTENT,
    "trajectories/aa-content-list-junk.jsonl": r":1: messages\[0\]\.content\[0\] " + _PART + "1$",
    "trajectories/aa-content-part-text-integer.jsonl": r":1: messages\[0\]\.content\[0\]\.text must be a string, got 5",
    "trajectories/aa-content-part-no-type.jsonl": r":1: messages\[0\]\.content\[0\] " + _PART,
    "trajectories/aa-role-nonsense.jsonl": r":1: messages\[0\]\." + _ROLES + '"wizard"',
    "trajectories/aa-role-missing.jsonl": r":1: messages\[0\]\." + _ROLES + "nothing",
    "trajectories/aa-message-string.jsonl": r":1: messages\[0\] must be an object \(a chat message\)",
    "trajectories/aa-reasoning-integer.jsonl": r":1: messages\[0\]\.reasoning_content must be a string, got 5",
    "trajectories/aa-name-list.jsonl": r":1: messages\[0\]\.name must be a string",
    "trajectories/aa-messages-empty.jsonl": r":1: messages must be a non-empty list, got \[\]",
    "trajectories/aa-delay-nan.jsonl": r":1: NaN is not a number; expected a finite number",
    "trajectories/aa-delay-infinity.jsonl": r":1: Infinity is not a number; expected a finite number",
    "trajectories/aa-delay-1e999.jsonl": r":1: the number '1e999' overflows; expected a finite number",
    "trajectories/aa-delay-1e300.jsonl": r":1: simulated_tool_delay_ms_after must be a non-negative number, at most 8\.64e\+07",
    "trajectories/aa-recorded-duration-negative.jsonl": r":1: recorded_tool_calls_after\[0\]\.duration_ms must be a non-negative",
    "trajectories/aa-conversation-id-newline.jsonl": r":1: conversation_id " + _ID + r'"a\\nb"',
    "trajectories/aa-conversation-id-long.jsonl": r":1: conversation_id " + _ID,
    "trajectories/aa-duplicate-index.jsonl": r":2: conversation_idx 0 of conversation 'c' repeats .*:1$",
    "trajectories/aa-line-not-object.jsonl": r":2: each line must be a JSON object, got \[1, 2\]",
    "trajectories/aa-truncated-line.jsonl": r":1: not valid JSON \(Invalid control character at column 41\)$",
    "trajectories/aa-binary.jsonl": r":1: binary data \(a NUL byte\), not text; expected UTF-8 JSON lines",
    "trajectories/aa-latin1.jsonl": r":1: not UTF-8 text \(byte 0xe9 at offset \d+\); expected UTF-8 JSON lines",
    "trajectories/aa-not-gzip.jsonl.gz": r": cannot read \(Not a gzipped file",
    "trajectories/aa-corrupt.jsonl.gz": r": cannot read \(Error -3 while decompressing data",
    "trajectories/aa-truncated.jsonl.gz": r": cannot read \(Compressed file ended before the end-of-stream marker",
    # Mooncake traces
    "trajectories/mooncake-input-length-huge.jsonl": r":1: input_length must be a positive integer at most 10,000,000",
    "trajectories/mooncake-output-length-huge.jsonl": r":1: output_length must be a positive integer " + _LIMIT,
    "trajectories/mooncake-hash-ids-strings.jsonl": r":1: hash_ids must be a list of integers",
    "trajectories/mooncake-hash-id-5000-digits.jsonl": r":1: " + _HUGE_INT,
    "trajectories/mooncake-hash-ids-count.jsonl": r":1: hash_ids must have ceil\(input_length / 512\) = 2 ids, got 3",
    "trajectories/mooncake-timestamp-1e999.jsonl": r":1: the number '1e999' overflows",
    "trajectories/mooncake-timestamp-1e300.jsonl": r":1: timestamp must be a non-negative number, at most 1e\+15, got 1e\+300",
    "trajectories/mooncake-output-zero.jsonl": r":1: output_length must be a positive integer " + _LIMIT + ", got 0",
    # agentperf's compact format
    "trajectories/compact-content-tokens-1e12.jsonl":
        r":1: turns\[0\]\.messages\[0\]\.content_tokens must be a non-negative integer at most 10,000,000, got 1000000000000",
    "trajectories/compact-prompt-over-10m.jsonl": r":1: turns\[0\]'s prompt must be at most 10,000,000 tokens, got 12,000,\d+",
    "trajectories/compact-output-tokens-1e22.jsonl": r":1: turns\[0\]\.output_tokens must be a positive integer " + _LIMIT,
    "trajectories/compact-tool-wait-1e300.jsonl": r":1: turns\[0\]\.tool_wait_s must be a non-negative number, at most 86,400",
    "trajectories/compact-content-integer.jsonl": r":1: turns\[0\]\.messages\[0\]\.content " + _CONTENT + "5$",
    "trajectories/compact-content-list-junk.jsonl": r":1: turns\[0\]\.messages\[0\]\.content\[1\] " + _PART + "7$",
    "trajectories/compact-role-nonsense.jsonl": r":1: turns\[0\]\.messages\[0\]\." + _ROLES + '"wizard"',
    "trajectories/compact-tool-call-shape.jsonl": r":1: turns\[0\]\.messages\[0\]\.tool_calls\[0\]\.function must be an object",
    "trajectories/compact-arguments-tokens-huge.jsonl": r":1: .*arguments_tokens must be an integer >= 8 at most 10,000,000",
    "trajectories/compact-header-version.jsonl": r":1: agentperf must be 1 \(the format version\), got 99",
    "trajectories/compact-id-newline.jsonl": r":1: id " + _ID + r'"t\\nu"',
    "trajectories/compact-alias-bomb.yaml": r":7: " + _BOMB,
    "trajectories/compact-deep.yaml": r":1: " + _DEEP,
    "trajectories/compact-int-5000-digits.yaml": r":4: an integer of 5000 characters; expected at most 39 digits",
    "trajectories/compact-tool-wait-inf.yaml": r":4: turns\[0\]\.tool_wait_s must be a non-negative number, at most 86,400, got Infinity",
    "trajectories/compact-tool-wait-nan.yaml": r":4: turns\[0\]\.tool_wait_s must be a non-negative number, at most 86,400, got NaN",
    "trajectories/compact-content-tokens-huge.yaml": r":5: turns\[0\]\.messages\[0\]\.content_tokens must be a non-negative integer at most",
    "trajectories/compact-role-nonsense.yaml": r":5: turns\[0\]\.messages\[0\]\." + _ROLES + '"wizard"',
    "trajectories/compact-id-newline.yaml": r":2: id " + _ID + r'"t\\nu"',
    "trajectories/compact-binary.yaml": r":2: binary data \(a NUL byte\), not text; expected a YAML trajectory set",
    "trajectories/compact-latin1.yaml": r":2: not UTF-8 text \(byte 0xe9 at offset \d+\); expected a YAML trajectory set",
    "trajectories/compact-python-tag.yaml": r":1: not valid YAML \(could not determine a constructor for the tag",
    "trajectories/compact-syntax.yaml": r":3: not valid YAML \(did not find expected",
    # manifests: the location is the manifest
    "manifests/absolute/manifest.json": r': trace file "/etc/passwd" ' + _OUTSIDE,
    "manifests/dotdot/manifest.json": r': trace file "\.\./outside\.jsonl" ' + _OUTSIDE,
    "manifests/dotdot-deep/manifest.json": r': trace file "sub/\.\./\.\./outside\.jsonl" ' + _OUTSIDE,
    "manifests/not-a-list/manifest.json": r": a manifest must list trace files: tasks\[\]\.trace, traces: \[\.\.\.\], or a list of paths",
    "manifests/empty-entry/manifest.json": r": a manifest must list trace files",
    "manifests/deep/manifest.json": r": " + _DEEP,
    "manifests/int-5000-digits/manifest.json": r": " + _HUGE_INT,
    "manifests/binary/manifest.json": r":1: binary data \(a NUL byte\), not text; expected a JSON manifest",
    "manifests/missing-trace/manifest.json": r": trace file missing\.jsonl does not exist",
    # SLO files: "<file>: <field or line N>: ..."
    "slo/slo-alias-bomb.yaml": r": line 5: " + _BOMB,
    "slo/slo-tier-name-newline.yaml": r": tiers\[0\]\." + _NAME + r"'fast\\nTTFT 1 s'$",
    "slo/slo-tier-name-control.yaml": r": tiers\[0\]\." + _NAME + r"'fast\\x1b\[31m'$",
    "slo/slo-tier-name-integer.yaml": r": tiers\[0\]\." + _NAME + "5$",
    "slo/slo-binary.yaml": r": line 3: binary data \(a NUL byte\), not text; expected an SLO file \(YAML\)",
    "slo/slo-latin1.yaml": r": line 2: not UTF-8 text \(byte 0xe9 at offset \d+\); expected an SLO file",
    "slo/slo-int-5000-digits.yaml": r": line 2: an integer of 5000 characters; expected at most 39 digits",
    "slo/slo-deep.yaml": r": line 1: " + _DEEP,
    "slo/slo-ttft-inf.yaml": r": " + _TTFT + "inf$",
    "slo/slo-ttft-nan.yaml": r": " + _TTFT + "nan$",
    "slo/slo-ttft-1e300.yaml": r": " + _TTFT + r"1e\+300$",
    "slo/slo-speed-1e300.yaml": r": tiers\[0\]\.output_tps_min: expected a number >= 0, at most 1e\+06, got 1e\+300",
    "slo/slo-not-mapping.yaml": r": top level: expected a mapping with a 'tiers' list, got list",
    "slo/slo-scope-list.yaml": r": tiers\[0\]\.scope: expected one of request, agent, got a list of 1 item",
    "slo/slo-syntax.yaml": r": line 3: not valid YAML \(",
    # simulator profiles: "<file>: <field or line N>: expected ..."
    "profiles/profile-alias-bomb.yaml": r": line 5: " + _PROFILE_YAML + _BOMB,
    "profiles/profile-binary.yaml": r": line 1: " + _PROFILE_YAML + r"binary data \(a NUL byte\), not text",
    "profiles/profile-latin1.yaml": r": line 5: " + _PROFILE_YAML + r"not UTF-8 text \(byte 0xe9",
    "profiles/profile-int-5000-digits.yaml": r": line 6: " + _PROFILE_YAML + "an integer of 5000 characters",
    "profiles/profile-memory-inf.yaml": r": gpu\.memory_gib: expected a positive number, at most 1e\+07, got inf$",
    "profiles/profile-bandwidth-nan.yaml": r": gpu\.bandwidth_gb_s: expected a positive number, at most 1e\+07, got nan$",
    "profiles/profile-tflops-1e300.yaml": r": gpu\.bf16_tflops: expected a positive number, at most 1e\+07, got 1e\+300$",
    "profiles/profile-memory-huge.yaml": r": gpu\.memory_gib: expected a KV cache of at most 67,108,864 tokens",
    "profiles/profile-mfu-tiny.yaml": r": efficiency: expected a one-token decode step of at most 10 s .*, got '1\.73e\+295 s'$",
    "profiles/profile-deep.yaml": r": line \d+: " + _PROFILE_YAML + _DEEP,
    "profiles/profile-gpu-name-newline.yaml": r": gpu\.name: expected a non-empty string of one line, at most 500 characters, got 'H100\\nSXM'",
    "profiles/profile-python-tag.yaml": r": line 6: " + _PROFILE_YAML + r"not valid YAML \(could not determine a constructor",
}


def _load(path: Path) -> None:
    """The loader the commands run on ``path``, by the corpus folder it is in."""
    kind = path.relative_to(CORPUS).parts[0]
    if kind == "slo":
        load_slo(path)
    elif kind == "profiles":
        load_profile(path)
    else:
        load_trajectories(str(path))


def _assert_one_located_line(message: str, path: Path, expected: str) -> None:
    assert "\n" not in message and message.isprintable(), message
    assert message.startswith(str(path)), message
    assert re.search(re.escape(str(path)) + expected, message), message


def test_the_corpus_has_a_case_for_every_file_and_at_least_60():
    files = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files - HELPERS == set(EXPECTED)
    assert len(EXPECTED) >= 60


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_malformed_file_fails_in_one_line_naming_the_file_and_what_was_expected(case):
    path = CORPUS / case
    with pytest.raises((AgentperfError, ProfileError)) as error:
        _load(path)
    _assert_one_located_line(str(error.value), path, EXPECTED[case])


# --- inputs made here ---------------------------------------------------------------------------------


def _gzip_bomb(path: Path, megabytes: int) -> Path:
    """Blank (whitespace) lines of a megabyte each: they inflate about 1000x and are skipped by the
    reader, so only the inflation bound stops it."""
    line = b" " * (1024 * 1024 - 1) + b"\n"
    with gzip.open(path, "wb", compresslevel=9) as handle:
        for _ in range(megabytes):
            handle.write(line)
    return path


def test_a_gzip_bomb_stops_at_the_inflation_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(readers_common, "GZIP_FREE_BYTES", 2 * 1024 * 1024)
    path = _gzip_bomb(tmp_path / "bomb.jsonl.gz", 16)
    with pytest.raises(AgentperfError) as error:
        load_trajectories(str(path))
    _assert_one_located_line(str(error.value), path, r":\d+: inflates more than 200x; expected gzip-compressed JSONL")


def test_an_over_long_line_and_an_oversized_yaml_file_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(readers_common, "MAX_LINE_BYTES", 1000)
    long_line = tmp_path / "long.jsonl"
    long_line.write_text(json.dumps({"conversation_id": "c" * 2000}) + "\n")
    with pytest.raises(AgentperfError) as error:
        load_trajectories(str(long_line))
    _assert_one_located_line(str(error.value), long_line, r":1: line longer than 1,000 bytes")
    monkeypatch.setattr(compact_reader, "MAX_YAML_BYTES", 1000)
    big = tmp_path / "big.yaml"
    big.write_text("trajectories: []\n" + "# padding\n" * 200)
    with pytest.raises(AgentperfError) as error:
        load_trajectories(str(big))
    _assert_one_located_line(str(error.value), big, r": larger than 1,000 bytes; expected a YAML trajectory set")


def test_a_manifest_reaches_outside_its_folder_only_when_the_user_allows_it(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "trace.jsonl").write_text((CORPUS / "manifests" / "outside.jsonl").read_text())
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "link").symlink_to(outside, target_is_directory=True)
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"traces": ["link/trace.jsonl"]}))  # relative, but a link leads out
    monkeypatch.delenv(MANIFEST_OUTSIDE_ENV, raising=False)
    with pytest.raises(AgentperfError) as error:
        load_trajectories(str(manifest))
    _assert_one_located_line(str(error.value), manifest, r': trace file "link/trace\.jsonl" ' + _OUTSIDE)
    assert len(load_trajectories(str(manifest), allow_outside=True)) == 1
    monkeypatch.setenv(MANIFEST_OUTSIDE_ENV, "1")
    assert len(load_trajectories(str(CORPUS / "manifests" / "dotdot" / "manifest.json"))) == 1


def test_trajectories_stats_allows_a_manifest_outside_its_folder_only_when_asked(capsys, monkeypatch):
    from agentperf_users.cli.main import main

    monkeypatch.delenv(MANIFEST_OUTSIDE_ENV, raising=False)
    manifest = str(CORPUS / "manifests" / "dotdot" / "manifest.json")
    assert main(["trajectories", "stats", manifest]) == 2
    assert "is outside the manifest's folder" in capsys.readouterr().err
    assert main(["trajectories", "stats", "--json", manifest, "--allow-outside-manifest"]) == 0
    assert json.loads(capsys.readouterr().out)["trajectories"] == 1


def test_small_aliases_and_nesting_up_to_the_limit_still_load(tmp_path):
    shared = tmp_path / "shared.yaml"  # an anchor for a system prompt every trajectory repeats: fine
    shared.write_text("trajectories:\n"
                      "  - {id: a, turns: [{output_tokens: 5, messages: [&system {role: system, content: be brief}, "
                      "{role: user, content: hi}]}]}\n"
                      "  - {id: b, turns: [{output_tokens: 5, messages: [*system, {role: user, content: yo}]}]}\n")
    trajectories = load_trajectories(str(shared))
    assert trajectories.trajectory(1).turns[0].messages[0]["content"] == "be brief"
    assert loads_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) == _nested(MAX_DEPTH)
    for too_deep in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '{"a": [' * 40 + "0" + "]}" * 40):
        with pytest.raises(InputError, match=f"nested more than {MAX_DEPTH} levels deep"):
            loads_json(too_deep)
    assert loads_json('{"text": "' + "[" * 500 + '"}') == {"text": "[" * 500}  # brackets in a string don't count


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# --- option values ----------------------------------------------------------------------------------


def _search_options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser, [Group.SEARCH])
    return parser.parse_args(argv)


@pytest.mark.parametrize(("argv", "expected"), [
    (("--window-s", "inf"), "--window-s: expected a number > 0, at most 86400, got inf"),
    (("--window-s", "nan"), "--window-s: expected a number > 0, at most 86400, got nan"),
    (("--warmup-s", "1e300"), "--warmup-s: expected a number >= 0, at most 86400, got 1e+300"),
    (("--step-factor", "inf"), "--step-factor: expected a number > 0, at most 1000, got inf"),
    (("--agent-spawn-rate=-inf",), "--agent-spawn-rate: expected a number > 0, at most 10000, got -inf"),
    (("--max-agents", "10" + "0" * 30), "--max-agents: expected an integer >= 1, at most 100000, got 10000000000000000000000000000000"),
    (("--start-agents", "0"), "--start-agents: expected an integer >= 1, at most 100000, got 0"),
])
def test_search_option_values_out_of_bounds_fail_in_one_line(argv, expected):
    with pytest.raises(AgentperfError) as error:
        SearchParameters.from_options(_search_options(*argv))
    assert str(error.value) == expected


def test_search_options_from_the_web_ui_are_strings_and_are_bounded_too():
    options = _search_options()
    options.window_s, options.start_agents = "45", "2"
    params = SearchParameters.from_options(options)
    assert (params.window_s, params.start_agents) == (45.0, 2)
    options.window_s = "9" * 5000
    with pytest.raises(AgentperfError, match=r"^--window-s: expected a number > 0, at most 86400, got '9{30}"):
        SearchParameters.from_options(options)


# --- the real commands --------------------------------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> dict[str, tuple[list[str], subprocess.CompletedProcess]]:
    """Each command run once, all at the same time (they are independent), under the memory limit. A
    few per entry point: each costs over a second of imports (the in-process cases cover the rest)."""
    tmp = tmp_path_factory.mktemp("commands")
    bomb = _gzip_bomb(tmp / "bomb.jsonl.gz", 24)
    trajectories, slo, profiles = CORPUS / "trajectories", CORPUS / "slo", CORPUS / "profiles"
    capacity = ["capacity", "--workers", "1", "--out", str(tmp / "run")]
    cases = {
        "stats-alias-bomb": (["trajectories", "stats", str(trajectories / "compact-alias-bomb.yaml")],
                             trajectories / "compact-alias-bomb.yaml"),
        "stats-gzip-bomb": (["trajectories", "stats", str(bomb)], bomb),
        "simulate-profile-inf": (["simulate", "--port", "0", "--profile", str(profiles / "profile-memory-inf.yaml")],
                                 profiles / "profile-memory-inf.yaml"),
        "capacity-slo-alias-bomb": ([*capacity, "--slo", str(slo / "slo-alias-bomb.yaml")], slo / "slo-alias-bomb.yaml"),
        "capacity-profile-1e300": ([*capacity, "--profile", str(profiles / "profile-tflops-1e300.yaml")],
                                   profiles / "profile-tflops-1e300.yaml"),
        "capacity-window-inf": ([*capacity, "--window-s", "inf"], "--window-s"),
    }
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(MANIFEST_OUTSIDE_ENV, None)
    running = {name: subprocess.Popen([sys.executable, "-m", "agentperf_users.cli.main", *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_limit_memory)
               for name, (argv, _) in cases.items()}
    results = {}
    try:
        for name, process in running.items():
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
            results[name] = (str(cases[name][1]), stdout, stderr, process.returncode)
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not (tmp / "run").exists()  # capacity checked every input before it created anything
    return results


@pytest.mark.parametrize("name", ["stats-alias-bomb", "stats-gzip-bomb", "simulate-profile-inf", "capacity-slo-alias-bomb",
                                  "capacity-profile-1e300", "capacity-window-inf"])
def test_the_command_exits_2_with_one_line_naming_the_input(commands, name):
    named, stdout, stderr, code = commands[name]
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert named in lines[0]
    assert re.match(r"agentperf( simulate)?: error: ", lines[0])

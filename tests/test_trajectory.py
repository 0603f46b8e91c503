"""Trajectory readers (AA, Mooncake, compact YAML/JSONL), the model's sharing and namespacing, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agentperf_users.errors import AgentperfError
from agentperf_users.tokens import PromptEncoder, count_prompt_tokens, count_tokens
from agentperf_users.workload.readers import compact as compact_reader
from agentperf_users.workload.readers import load_trajectories
from agentperf_users.workload.textgen import filler
from agentperf_users.workload.trajectory import Trajectory, TrajectorySet

FIXTURES = Path(__file__).parent / "fixtures" / "trajectories"


def _all_turns(trajectories: TrajectorySet):
    for index in range(len(trajectories)):
        yield from trajectories.trajectory(index).turns


def _assert_consistent(trajectories: TrajectorySet) -> None:
    """prompt_tokens is the simulator's count, and shapes agree with the materialised turns."""
    for index in range(len(trajectories)):
        trajectory = trajectories.trajectory(index)
        assert tuple(turn.shape for turn in trajectory.turns) == trajectories.shapes(index)
        for turn in trajectory.turns:
            assert turn.prompt_tokens == count_prompt_tokens(turn.messages, turn.tools)


def _assert_extends_previous_turn(trajectory: Trajectory) -> None:
    for previous, turn in zip(trajectory.turns, trajectory.turns[1:]):
        assert len(turn.messages) > len(previous.messages)
        assert all(a is b for a, b in zip(previous.messages, turn.messages))
        assert turn.tools is previous.tools


# --- AA traces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ("aa/manifest.json", "aa"))
def test_aa_groups_conversations_across_files_and_orders_by_index(spec):
    trajectories = load_trajectories(str(FIXTURES / spec))
    assert trajectories.name == "aa"
    assert [trajectories.trajectory_id(i) for i in range(len(trajectories))] == ["conv-a", "conv-b"]
    conv_a, conv_b = trajectories.trajectory(0), trajectories.trajectory(1)
    assert [t.output_tokens for t in conv_a.turns] == [40, 60, 25]  # idx 2 lives in the second file
    assert [t.tool_wait_s for t in conv_a.turns] == [1.2, 0.3, 0.0]
    assert [t.output_tokens for t in conv_b.turns] == [30, 12]  # written idx 1 first
    assert conv_b.turns[0].tool_wait_s == pytest.approx(0.2)  # sum of recorded_tool_calls_after
    assert conv_a.turns[0].tools[0]["function"]["name"] == "run_tests"
    _assert_consistent(trajectories)


def test_aa_shares_repeated_history_between_turns():
    trajectories = load_trajectories(str(FIXTURES / "aa"), fmt="aa")
    for index in range(len(trajectories)):
        _assert_extends_previous_turn(trajectories.trajectory(index))


# --- Mooncake traces ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mooncake() -> TrajectorySet:
    return load_trajectories(str(FIXTURES / "mooncake.jsonl"))


def _recorded_requests() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "mooncake.jsonl").read_text().splitlines()]


def test_mooncake_rebuilds_sessions_from_shared_prefixes(mooncake):
    # Requests 0 -> 1 -> 3 extend each other's complete blocks; 2 -> 5 share only block 1 with them,
    # so they form their own session; 4 (under one block) stands alone.
    by_input = {r["input_length"]: i for i, r in enumerate(_recorded_requests())}
    sessions = [[by_input[s.prompt_tokens] for s in mooncake.shapes(i)] for i in range(len(mooncake))]
    assert sessions == [[0, 1, 3], [2, 5], [4]]
    # Tool waits are the gaps to the session's next request, capped at 10 s.
    assert [s.tool_wait_s for s in mooncake.shapes(0)] == [2.0, 10.0, 0.0]
    assert [s.output_tokens for s in mooncake.shapes(1)] == [30, 25]
    _assert_consistent(mooncake)


def _common_blocks(a, b) -> int:
    encoder = PromptEncoder()
    blocks_a, blocks_b = encoder.encode(a.messages).block_hashes, encoder.encode(b.messages).block_hashes
    return next((i for i, (x, y) in enumerate(zip(blocks_a, blocks_b)) if x != y), min(len(blocks_a), len(blocks_b)))


def test_mooncake_shared_hash_ids_give_byte_identical_prefixes(mooncake):
    first, second, third = mooncake.trajectory(0).turns
    other = mooncake.trajectory(1).turns[0]
    lone = mooncake.trajectory(2).turns[0]
    # Block id 1 opens every request but the lone one: the same 512 prompt tokens, byte for byte.
    assert first.messages[0]["content"] == other.messages[0]["content"]
    assert _common_blocks(first, other) == 512 // 16  # one shared Mooncake block = 32 simulator blocks
    # Within a session the shared prefix covers the complete shared blocks and no more than the shorter prompt.
    assert 2 * 512 // 16 <= _common_blocks(second, third) <= second.prompt_tokens // 16
    assert _common_blocks(first, lone) == 0
    assert first.messages[0] is second.messages[0] is third.messages[0]


# --- compact format ----------------------------------------------------------------------------------


def _materialised(trajectories: TrajectorySet) -> list:
    return [(t.id, [(turn.messages, turn.tools, turn.shape) for turn in t.turns])
            for t in (trajectories.trajectory(i) for i in range(len(trajectories)))]


def test_compact_yaml_and_jsonl_are_the_same_set():
    from_yaml = load_trajectories(str(FIXTURES / "compact.yaml"))
    from_jsonl = load_trajectories(str(FIXTURES / "compact.jsonl"))
    assert _materialised(from_yaml) == _materialised(from_jsonl)
    _assert_consistent(from_yaml)


def test_compact_generates_exact_deterministic_content():
    trajectories = load_trajectories(str(FIXTURES / "compact.jsonl"))
    literal, generated = trajectories.trajectory(0), trajectories.trajectory(1)
    assert literal.turns[0].messages[1] == {"role": "user", "content": "Make the build pass."}
    assert literal.turns[0].tools[0]["function"]["name"] == "bash"  # header tools
    assert generated.turns[0].tools == ()  # the trajectory's own (empty) tools
    system, user = generated.turns[0].messages
    assert system["content"] == filler(200, "shared-system")
    assert count_tokens(user["content"]) == 50
    assistant, result_1, result_2 = generated.turns[1].messages[2:]
    assert count_tokens(assistant["content"]) == 20
    calls = assistant["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["read", "grep"]
    assert [count_tokens(c["function"]["arguments"]) for c in calls] == [30, 12]
    # Tool messages without tool_call_id answer the assistant's calls in order.
    assert [result_1["tool_call_id"], result_2["tool_call_id"]] == [c["id"] for c in calls]
    assert [count_tokens(result_1["content"]), count_tokens(result_2["content"])] == [400, 80]
    assert [t.tool_wait_s for t in generated.turns] == [0.25, 2.0, 0.0]
    _assert_extends_previous_turn(generated)


def test_loading_is_lazy_and_materialised_trajectories_are_cached(monkeypatch):
    calls = []
    monkeypatch.setattr(compact_reader, "filler", lambda *a, **k: calls.append(a) or filler(*a, **k))
    trajectories = load_trajectories(str(FIXTURES / "compact.yaml"))
    assert calls == []
    first = trajectories.trajectory(1)
    assert len(calls) == 5  # system, user, assistant and two tool results; the last turn is literal
    assert trajectories.trajectory(1) is first and len(calls) == 5
    with pytest.raises(IndexError):
        trajectories.trajectory(len(trajectories))


# --- namespacing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ("compact.yaml", "aa", "mooncake.jsonl"))
def test_with_namespace_changes_only_the_first_user_message(spec):
    trajectories = load_trajectories(str(FIXTURES / spec))
    for index in range(len(trajectories)):
        original = trajectories.trajectory(index)
        snapshot = json.dumps([t.messages for t in original.turns])
        marked = original.with_namespace("agent-17")
        marked_messages = set()
        for before, after in zip(original.turns, marked.turns):
            first_user = next(i for i, m in enumerate(before.messages) if m["role"] == "user")
            for i, (a, b) in enumerate(zip(before.messages, after.messages, strict=True)):
                if i == first_user:
                    assert b["content"] == "[agentperf session agent-17]\n" + a["content"]
                    assert {k: v for k, v in b.items() if k != "content"} == {k: v for k, v in a.items() if k != "content"}
                    marked_messages.add(id(b))
                else:
                    assert b is a
            assert after.tools is before.tools
            assert (after.output_tokens, after.tool_wait_s) == (before.output_tokens, before.tool_wait_s)
            assert after.prompt_tokens == count_prompt_tokens(after.messages, after.tools)
        assert len(marked_messages) == 1  # one shared marked object across all turns
        assert json.dumps([t.messages for t in original.turns]) == snapshot  # the original is untouched


# --- bundled sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", (("default", 400), ("demo", 64)))
def test_bundled_sets_load_by_name(name, count):
    trajectories = load_trajectories(name)
    assert (trajectories.name, len(trajectories)) == (name, count)
    turn = trajectories.trajectory(0).turns[0]
    assert turn.prompt_tokens == count_prompt_tokens(turn.messages, turn.tools)


# --- errors ------------------------------------------------------------------------------------------

AA_LINE = {"conversation_id": "c", "conversation_idx": 0, "messages": [{"role": "user", "content": "hi"}],
           "target_output_tokens": 10}
MOONCAKE_LINE = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
COMPACT_LINE = {"id": "t", "turns": [{"messages": [{"role": "user", "content": "hi"}], "output_tokens": 5}]}


def _jsonl(*objects) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects)


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _turn_with(**changes) -> dict:
    return {"id": "t", "turns": [COMPACT_LINE["turns"][0], {**COMPACT_LINE["turns"][0], **changes}]}


BAD_FILES = [
    ("x.jsonl", _jsonl(AA_LINE, _with(AA_LINE, conversation_idx=1, target_output_tokens="abc")),
     r'x\.jsonl:2: target_output_tokens must be a positive integer at most 1,000,000, got "abc"$'),
    ("x.jsonl", _jsonl(AA_LINE, AA_LINE), r"x\.jsonl:2: conversation_idx 0 of conversation 'c' repeats .*x\.jsonl:1$"),
    ("x.jsonl", _jsonl(AA_LINE, _with(AA_LINE, conversation_idx=1, messages=["hi"])),
     r'x\.jsonl:2: messages\[0\] must be an object \(a chat message\), got "hi"$'),
    ("x.jsonl", _jsonl(AA_LINE, "", "{not json"), r"x\.jsonl:3: not valid JSON \("),
    ("x.jsonl", _jsonl(MOONCAKE_LINE, _with(MOONCAKE_LINE, hash_ids=[1, 2, 3])),
     r"x\.jsonl:2: hash_ids must have ceil\(input_length / 512\) = 2 ids, got 3$"),
    ("x.jsonl", _jsonl(_with(MOONCAKE_LINE, output_length=0)), r"x\.jsonl:1: output_length must be a positive integer at most 1,000,000, got 0$"),
    ("x.jsonl", _jsonl({"k": 1}), r"x\.jsonl:1: unknown trajectory format: expected an AA trace line"),
    ("x.jsonl", _jsonl(COMPACT_LINE, _turn_with(output_tokens=-3)),
     r"x\.jsonl:2: turns\[1\]\.output_tokens must be a positive integer at most 1,000,000, got -3$"),
    ("x.jsonl", _jsonl(_turn_with(ouput_tokens=3)), r"x\.jsonl:1: turns\[1\] has unknown field 'ouput_tokens'"),
    ("x.jsonl", _jsonl(COMPACT_LINE, COMPACT_LINE), r"x\.jsonl:2: trajectory id 't' repeats .*x\.jsonl:1"),
    ("x.jsonl", _jsonl(_turn_with(messages=[{"role": "tool", "content_tokens": 5}])),
     r"x\.jsonl:1: turns\[1\]\.messages\[0\] is a tool message without tool_call_id"),
    ("x.yaml", "trajectories:\n  - id: t\n    turns:\n      - output_tokens: 5\n        messages:\n"
               "          - {role: user, content: hi}\n          - {role: user, content_tokens: many}\n",
     r"x\.yaml:7: turns\[0\]\.messages\[1\]\.content_tokens must be a non-negative integer at most 10,000,000, got \"many\"$"),
    ("x.yaml", "trajectories: [\n  {id: t\n", r"x\.yaml:\d+: not valid YAML \("),
    ("x.jsonl", "", r"x\.jsonl: empty file, no trajectories$"),
]


@pytest.mark.parametrize("name, text, expected", BAD_FILES)
def test_malformed_files_fail_with_one_located_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AgentperfError) as error:
        load_trajectories(str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert re.search(expected, message), message


def test_bad_specs_and_formats_fail_clearly(tmp_path):
    with pytest.raises(AgentperfError, match=r"no-such-set: no such trajectory file or folder, and not a bundled set \(.*default.*\)"):
        load_trajectories("no-such-set")
    with pytest.raises(AgentperfError, match=r"unknown trajectory format 'csv'"):
        load_trajectories(str(FIXTURES / "mooncake.jsonl"), fmt="csv")
    with pytest.raises(AgentperfError, match=r"mooncake\.jsonl:1: conversation_id must be a non-empty string"):
        load_trajectories(str(FIXTURES / "mooncake.jsonl"), fmt="aa")
    with pytest.raises(AgentperfError, match=r"no trajectory files"):
        load_trajectories(str(tmp_path))
    (tmp_path / "a.jsonl").write_text(_jsonl(AA_LINE))
    (tmp_path / "b.jsonl").write_text(_jsonl(MOONCAKE_LINE))
    with pytest.raises(AgentperfError, match=r"one set must use one format, but .*a\.jsonl is aa and .*b\.jsonl is mooncake"):
        load_trajectories(str(tmp_path))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"traces": ["a.jsonl", "missing.jsonl"]}))
    with pytest.raises(AgentperfError, match=r"manifest\.json: trace file missing\.jsonl does not exist"):
        load_trajectories(str(manifest))


def test_documented_examples_load(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "trajectory-formats.md").read_text()
    (tmp_path / "example.yaml").write_text(re.search(r"```yaml\n(.*?)```", doc, flags=re.S).group(1))
    (tmp_path / "example.jsonl").write_text(re.search(r"```json\n(.*?)```", doc, flags=re.S).group(1))
    from_yaml = load_trajectories(str(tmp_path / "example.yaml"))
    assert [s.output_tokens for s in from_yaml.shapes(0)] == [120, 300, 80]
    assert [s.tool_wait_s for s in from_yaml.shapes(0)] == [0.8, 1.2, 0.0]
    _assert_consistent(from_yaml)
    from_jsonl = load_trajectories(str(tmp_path / "example.jsonl"))
    assert from_jsonl.trajectory(0).turns[1].messages[2]["tool_call_id"] == "call_1_0"
    _assert_consistent(from_jsonl)

"""Write the malformed-input corpus next to this file: ``python tests/malformed/generate.py``.

Each file breaks a valid trajectory file, SLO file, simulator profile or manifest in exactly one way
(one defect class of issue 12 or a neighbour of one); ``tests/test_malformed.py`` says what each must
print. The files are committed, so a reader can open them; this script is how they were made and how
to remake them. Inputs too big to commit (a gzip bomb, an over-long line) are made by the test itself.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
AA = {"conversation_id": "c", "conversation_idx": 0, "messages": [{"role": "user", "content": "hi"}],
      "target_output_tokens": 10}
MOONCAKE = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
COMPACT = {"id": "t", "turns": [{"messages": [{"role": "user", "content": "hi"}], "output_tokens": 5}]}
SLO = "tiers:\n  - {name: fast, ttft_max_s: 2, output_tps_min: 30}\n"
PROFILE = (HERE.parent.parent / "agentperf_users" / "simulator" / "profiles" / "h100-llama3.1-8b.yaml").read_text()
NESTED_1000 = "[" * 1000 + "]" * 1000
DIGITS_5000 = "9" * 5000


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs document: ``width ** levels`` values once expanded, a few hundred bytes."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def message(**changes) -> dict:
    return {**AA["messages"][0], **changes}


def aa(**changes) -> str:
    return json.dumps({**AA, **changes}) + "\n"


def compact(message_changes: dict | None = None, **turn_changes) -> str:
    turn = {**COMPACT["turns"][0], **turn_changes}
    if message_changes is not None:
        turn["messages"] = [{**turn["messages"][0], **message_changes}]
    return json.dumps({"id": "t", "turns": [turn]}) + "\n"


def mooncake(**changes) -> str:
    return json.dumps({**MOONCAKE, **changes}) + "\n"


def profile(old: str, new: str) -> str:
    assert old in PROFILE, old
    return PROFILE.replace(old, new, 1)


TRAJECTORIES: dict[str, str | bytes] = {
    # AA traces
    "aa-int-5000-digits.jsonl": aa().replace('"conversation_idx": 0', f'"conversation_idx": {DIGITS_5000}'),
    "aa-output-tokens-20-digits.jsonl": aa(target_output_tokens=10**22),
    "aa-output-tokens-float.jsonl": aa(target_output_tokens=1e22),
    "aa-deep-nesting.jsonl": aa().replace('"content": "hi"', f'"content": {NESTED_1000}'),
    "aa-tool-calls-not-list.jsonl": aa(messages=[message(role="assistant", tool_calls=7)]),
    "aa-tool-calls-item-string.jsonl": aa(messages=[message(role="assistant", tool_calls=["call"])]),
    "aa-tool-call-function-string.jsonl": aa(messages=[message(role="assistant", tool_calls=[{"function": "run"}])]),
    "aa-tool-call-arguments-object.jsonl": aa(messages=[message(
        role="assistant", tool_calls=[{"id": "1", "function": {"name": "run", "arguments": {"a": 1}}}])]),
    "aa-content-integer.jsonl": aa(messages=[message(content=5)]),
    "aa-content-object.jsonl": aa(messages=[message(content={"text": "hi"})]),
    "aa-content-list-junk.jsonl": aa(messages=[message(content=[1, "x", None])]),
    "aa-content-part-text-integer.jsonl": aa(messages=[message(content=[{"type": "text", "text": 5}])]),
    "aa-content-part-no-type.jsonl": aa(messages=[message(content=[{"text": "hi"}])]),
    "aa-role-nonsense.jsonl": aa(messages=[message(role="wizard")]),
    "aa-role-missing.jsonl": aa(messages=[{"content": "hi"}]),
    "aa-message-string.jsonl": aa(messages=["hi"]),
    "aa-reasoning-integer.jsonl": aa(messages=[message(role="assistant", reasoning_content=5)]),
    "aa-name-list.jsonl": aa(messages=[message(name=["a"])]),
    "aa-messages-empty.jsonl": aa(messages=[]),
    "aa-delay-nan.jsonl": aa().replace("}\n", ', "simulated_tool_delay_ms_after": NaN}\n'),
    "aa-delay-infinity.jsonl": aa().replace("}\n", ', "simulated_tool_delay_ms_after": Infinity}\n'),
    "aa-delay-1e999.jsonl": aa().replace("}\n", ', "simulated_tool_delay_ms_after": 1e999}\n'),
    "aa-delay-1e300.jsonl": aa(simulated_tool_delay_ms_after=1e300),
    "aa-recorded-duration-negative.jsonl": aa(recorded_tool_calls_after=[{"duration_ms": -5}]),
    "aa-conversation-id-newline.jsonl": aa(conversation_id="a\nb"),
    "aa-conversation-id-long.jsonl": aa(conversation_id="c" * 300),
    "aa-duplicate-index.jsonl": aa() + aa(),
    "aa-line-not-object.jsonl": aa() + "[1, 2]\n",
    "aa-truncated-line.jsonl": aa()[:40] + "\n",
    "aa-binary.jsonl": b"\x00\x01\x02\xffPNG\x00" * 8,
    "aa-latin1.jsonl": json.dumps({**AA, "conversation_id": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"),
    "aa-not-gzip.jsonl.gz": aa().encode(),
    "aa-corrupt.jsonl.gz": gzip.compress(aa().encode() * 20)[:12] + b"\xde\xad\xbe\xef" * 16,
    "aa-truncated.jsonl.gz": gzip.compress((aa() * 200).encode())[:60],
    # Mooncake traces
    "mooncake-input-length-huge.jsonl": mooncake(input_length=10**12, hash_ids=[1]),
    "mooncake-output-length-huge.jsonl": mooncake(output_length=10**22),
    "mooncake-hash-ids-strings.jsonl": mooncake(hash_ids=["a", "b"]),
    "mooncake-hash-id-5000-digits.jsonl": mooncake().replace("[1, 2]", f"[1, {DIGITS_5000}]"),
    "mooncake-hash-ids-count.jsonl": mooncake(hash_ids=[1, 2, 3]),
    "mooncake-timestamp-1e999.jsonl": mooncake().replace('"timestamp": 0', '"timestamp": 1e999'),
    "mooncake-timestamp-1e300.jsonl": mooncake(timestamp=1e300),
    "mooncake-output-zero.jsonl": mooncake(output_length=0),
    # agentperf's compact format, JSONL
    "compact-content-tokens-1e12.jsonl": compact({"content_tokens": 10**12, "content": None})
    .replace('"content": null, ', "").replace(', "content": null', ""),
    "compact-prompt-over-10m.jsonl": json.dumps({"id": "t", "turns": [{"messages": [
        {"role": "user", "content_tokens": 6_000_000}, {"role": "user", "content_tokens": 6_000_000}],
        "output_tokens": 5}]}) + "\n",
    "compact-output-tokens-1e22.jsonl": compact(output_tokens=10**22),
    "compact-tool-wait-1e300.jsonl": compact(tool_wait_s=1e300),
    "compact-content-integer.jsonl": compact({"content": 5}),
    "compact-content-list-junk.jsonl": compact({"content": [{"type": "text", "text": "hi"}, 7]}),
    "compact-role-nonsense.jsonl": compact({"role": "wizard"}),
    "compact-tool-call-shape.jsonl": compact({"role": "assistant", "tool_calls": [{"function": "run"}]}),
    "compact-arguments-tokens-huge.jsonl": compact({"role": "assistant", "content": "x", "tool_calls": [
        {"name": "run", "arguments_tokens": 10**9}]}),
    "compact-header-version.jsonl": json.dumps({"agentperf": 99}) + "\n" + compact(),
    "compact-id-newline.jsonl": compact().replace('"id": "t"', '"id": "t\\nu"'),
    # agentperf's compact format, YAML
    "compact-alias-bomb.yaml": alias_bomb() + "trajectories: [*a8]\n",
    "compact-deep.yaml": "trajectories: " + "[" * 200 + "]" * 200 + "\n",
    "compact-int-5000-digits.yaml": f"trajectories:\n  - id: t\n    turns:\n      - output_tokens: {DIGITS_5000}\n"
                                    "        messages: [{role: user, content: hi}]\n",
    "compact-tool-wait-inf.yaml": "trajectories:\n  - id: t\n    turns:\n      - output_tokens: 5\n        tool_wait_s: .inf\n"
                                  "        messages: [{role: user, content: hi}]\n",
    "compact-tool-wait-nan.yaml": "trajectories:\n  - id: t\n    turns:\n      - output_tokens: 5\n        tool_wait_s: .nan\n"
                                  "        messages: [{role: user, content: hi}]\n",
    "compact-content-tokens-huge.yaml": "trajectories:\n  - id: t\n    turns:\n      - output_tokens: 5\n"
                                        "        messages: [{role: user, content_tokens: 1000000000000}]\n",
    "compact-role-nonsense.yaml": "trajectories:\n  - id: t\n    turns:\n      - output_tokens: 5\n"
                                  "        messages: [{role: wizard, content: hi}]\n",
    "compact-id-newline.yaml": 'trajectories:\n  - id: "t\\nu"\n    turns:\n      - output_tokens: 5\n'
                               "        messages: [{role: user, content: hi}]\n",
    "compact-binary.yaml": b"trajectories:\n  - id: t\x00\x01\n",
    "compact-latin1.yaml": "trajectories:\n  - id: caf\u00e9\n".encode("latin-1"),
    "compact-python-tag.yaml": "trajectories: !!python/object/apply:os.system [echo hi]\n",
    "compact-syntax.yaml": "trajectories: [\n  {id: t\n",
}

SLOS: dict[str, str | bytes] = {
    "slo-alias-bomb.yaml": alias_bomb() + "tiers: *a8\n",
    "slo-tier-name-newline.yaml": 'tiers:\n  - {name: "fast\\nTTFT 1 s", ttft_max_s: 2, output_tps_min: 30}\n',
    "slo-tier-name-control.yaml": 'tiers:\n  - {name: "fast\\u001b[31m", ttft_max_s: 2, output_tps_min: 30}\n',
    "slo-tier-name-integer.yaml": "tiers:\n  - {name: 5, ttft_max_s: 2, output_tps_min: 30}\n",
    "slo-binary.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
    "slo-latin1.yaml": "tiers:\n  - {name: caf\u00e9, ttft_max_s: 2, output_tps_min: 30}\n".encode("latin-1"),
    "slo-int-5000-digits.yaml": SLO.replace("ttft_max_s: 2", f"ttft_max_s: {DIGITS_5000}"),
    "slo-deep.yaml": "tiers: " + "[" * 200 + "]" * 200 + "\n",
    "slo-ttft-inf.yaml": SLO.replace("ttft_max_s: 2", "ttft_max_s: .inf"),
    "slo-ttft-nan.yaml": SLO.replace("ttft_max_s: 2", "ttft_max_s: .nan"),
    "slo-ttft-1e300.yaml": SLO.replace("ttft_max_s: 2", "ttft_max_s: 1.0e+300"),
    "slo-speed-1e300.yaml": SLO.replace("output_tps_min: 30", "output_tps_min: 1.0e+300"),
    "slo-not-mapping.yaml": "- just\n- a list\n",
    "slo-scope-list.yaml": SLO.replace("output_tps_min: 30", "output_tps_min: 30, scope: [agent]"),
    "slo-syntax.yaml": "tiers:\n  - [1, 2\n",
}

PROFILES: dict[str, str | bytes] = {
    "profile-alias-bomb.yaml": alias_bomb() + PROFILE.replace("  name: H100 SXM 80GB", "  name: *a8"),
    "profile-binary.yaml": b"\x7fELF\x02\x01\x01\x00\x00\x00" * 4,
    "profile-latin1.yaml": profile("  name: H100 SXM 80GB", "  name: H100 caf\u00e9").encode("latin-1"),
    "profile-int-5000-digits.yaml": profile("  count: 1", f"  count: {DIGITS_5000}"),
    "profile-memory-inf.yaml": profile("memory_gib: 79.2", "memory_gib: .inf"),
    "profile-bandwidth-nan.yaml": profile("bandwidth_gb_s: 3350", "bandwidth_gb_s: .nan"),
    "profile-tflops-1e300.yaml": profile("bf16_tflops: 989", "bf16_tflops: 1.0e+300"),
    "profile-memory-huge.yaml": profile("memory_gib: 79.2", "memory_gib: 9000000"),
    "profile-mfu-tiny.yaml": profile("mfu: 0.66", "mfu: 1.0e-300"),
    "profile-deep.yaml": PROFILE + "extra: " + "[" * 200 + "]" * 200 + "\n",
    "profile-gpu-name-newline.yaml": profile("  name: H100 SXM 80GB", '  name: "H100\\nSXM"'),
    "profile-python-tag.yaml": profile("  count: 1", "  count: !!python/name:os.system"),
}

MANIFESTS: dict[str, str | bytes] = {
    "absolute/manifest.json": json.dumps({"traces": ["/etc/passwd"]}),
    "dotdot/manifest.json": json.dumps({"traces": ["../outside.jsonl"]}),
    "dotdot-deep/manifest.json": json.dumps({"tasks": [{"trace": "sub/../../outside.jsonl"}]}),
    "not-a-list/manifest.json": json.dumps({"traces": "part.jsonl"}),
    "empty-entry/manifest.json": json.dumps(["", "part.jsonl"]),
    "deep/manifest.json": NESTED_1000,
    "int-5000-digits/manifest.json": f'{{"traces": ["part.jsonl"], "version": {DIGITS_5000}}}',
    "binary/manifest.json": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" * 4,
    "missing-trace/manifest.json": json.dumps({"traces": ["missing.jsonl"]}),
    "outside.jsonl": aa(),  # a valid file outside the manifests' folders: reading it would be the bug
}


def main() -> None:
    for folder, files in (("trajectories", TRAJECTORIES), ("slo", SLOS), ("profiles", PROFILES),
                          ("manifests", MANIFESTS)):
        for name, content in files.items():
            path = HERE / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
    print(f"wrote {sum(map(len, (TRAJECTORIES, SLOS, PROFILES, MANIFESTS)))} files under {HERE}")


if __name__ == "__main__":
    main()

"""Tests of the simulator's engine core; helpers shared by its test modules live here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agentperf_users.simulator.profile import DEFAULT_PROFILE, PROFILES_DIR, Profile, load_profile
from agentperf_users.simulator.tokenizer import BLOCK_SIZE, EncodedPrompt


def profile_data(name: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """A bundled profile's YAML as a plain dict, to modify."""
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())


def write_profile(tmp_path: Path, changes: dict[str, Any], name: str = DEFAULT_PROFILE) -> Path:
    """Write a copy of a bundled profile with ``{"section.key": value}`` changes (value ``...`` deletes)."""
    data = profile_data(name)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for parent in parents:
            node = node[parent]
        if value is ...:
            del node[key]
        else:
            node[key] = value
    path = tmp_path / "custom-profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def custom_profile(tmp_path: Path, changes: dict[str, Any], name: str = DEFAULT_PROFILE) -> Profile:
    return load_profile(write_profile(tmp_path, changes, name))


def make_prompt(num_tokens: int, conversation: int = 0) -> EncodedPrompt:
    """A prompt whose block ``i`` hash depends only on (conversation, i): prompts of one conversation
    share every full block they have in common, as chained hashes of a growing conversation do."""
    hashes = tuple(hash(("conversation", conversation, i)) for i in range(num_tokens // BLOCK_SIZE))
    return EncodedPrompt(num_tokens, hashes)

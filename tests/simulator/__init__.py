"""Tests of the simulator's engine core; helpers shared by its test modules live here."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    PROFILES_DIR,
    Profile,
    load_profile,
)
from agentperf_users.tokens import BLOCK_SIZE, EncodedPrompt


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


def simulator(*cli_args: str, env: dict[str, str] | None = None) -> SimulatorProcess:
    """A simulator server in a child process on a free port: ``with simulator("--profile", p) as sim``.

    A child process, not a thread: once any test imports locust, gevent has monkey-patched this
    process, and a server thread here would become a greenlet that blocks the tests talking to it.
    """
    return SimulatorProcess(["--port", "0", *cli_args], env=env)


def scrape(url: str) -> dict[str, list]:
    """The server's ``/metrics`` samples by sample name (e.g. ``vllm:prompt_tokens_total``)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def requests_in_engine(url: str) -> int:
    """Requests the server's engine holds, running or waiting (vLLM's two queue gauges)."""
    samples = scrape(url)
    return sum(int(s.value) for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
               for s in samples[name])

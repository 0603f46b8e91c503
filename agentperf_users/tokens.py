"""A deterministic, cheap tokenizer and chat template, shared by the simulator and anything that must
agree with it on what "N tokens" means.

Why not a real BPE: the simulator must run offline with no model files, and its token counts must be
reproducible by the harness (trajectory statistics, exact synthetic lengths). Why regex pieces rather
than characters/4: the counts then stay within a few per cent of a real BPE tokenizer on English and
code, and the generator in ``agentperf_users.workload.textgen`` can hit a count exactly.

Tokens
    A token is one match of :data:`TOKEN_RE`: a run of at most 12 letters (underscores count as
    letters), a run of at most 3 digits, or one other non-space character. Whitespace costs nothing.

Chat template (what ``prompt_tokens`` counts)
    ``tools`` (if any) cost ``TEMPLATE_OVERHEAD`` plus the tokens of their canonical JSON, and come
    first, as chat templates put tool definitions in the system preamble. Each message costs
    ``TEMPLATE_OVERHEAD`` (role markers) plus the tokens of its content (a string, or the ``text``
    parts of a list), its ``reasoning_content``/``reasoning``, and for each tool call the tokens of
    its function name and arguments. The prompt ends with ``TEMPLATE_OVERHEAD`` tokens that open the
    assistant's reply.

Cost
    Agents resend their whole conversation every turn. Re-tokenising 100K tokens per request would
    make the simulator, not the modelled GPU, the bottleneck, so :class:`PromptEncoder` caches the
    encoder state after every message prefix it has seen: a request costs tokenisation of its *new*
    messages only, plus a hash per message (done in C) and a list slice of the cached block hashes.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

TOKEN_RE = re.compile(r"[^\W\d]{1,12}|\d{1,3}|[^\w\s]")
TEMPLATE_OVERHEAD = 3
BLOCK_SIZE = 16
"""Tokens per KV block; prefix-cache hits are counted in whole blocks, as in vLLM."""

_ROLE_MARKERS = {role: (f"<|{role}|>", "<|sep|>", "\n") for role in ("system", "user", "assistant", "tool", "developer")}
_TOOLS_MARKER = ("<|tools|>", "<|sep|>", "\n")
_REPLY_MARKER = ("<|assistant|>", "<|sep|>", "<|reply|>")


def tokenize(text: str) -> list[str]:
    """The tokens of ``text``: deterministic, and the same text always gives the same list."""
    return TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """The number of tokens in ``text``."""
    return len(TOKEN_RE.findall(text))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text parts cost tokens here
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


def message_tokens(message: Mapping[str, Any]) -> list[str]:
    """The tokens one chat message contributes to a prompt, role markers included."""
    role = message.get("role", "user")
    tokens = list(_ROLE_MARKERS.get(role, (f"<|{role}|>", "<|sep|>", "\n")))
    for key in ("reasoning_content", "reasoning"):
        if message.get(key):
            tokens += tokenize(_content_text(message[key]))
    tokens += tokenize(_content_text(message.get("content")))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {} if isinstance(call, Mapping) else {}
        tokens += tokenize(str(function.get("name", "")))
        arguments = function.get("arguments", "")
        tokens += tokenize(arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True))
    return tokens


def tools_tokens(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The tokens a request's tool definitions contribute (none when there are no tools)."""
    if not tools:
        return []
    return list(_TOOLS_MARKER) + tokenize(json.dumps(tools, sort_keys=True, separators=(",", ":")))


def count_prompt_tokens(messages: Iterable[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> int:
    """``prompt_tokens`` of a chat request, exactly as the simulator reports it in ``usage``."""
    return len(tools_tokens(tools)) + sum(len(message_tokens(m)) for m in messages) + len(_REPLY_MARKER)


@dataclass(frozen=True)
class EncodedPrompt:
    """What the engine needs of a prompt: its length and the chained hash of each full block.

    ``block_hashes[i]`` identifies tokens ``[0, 16*(i+1))``: equal hashes mean an identical prefix,
    which is what a prefix cache keys on.
    """

    num_tokens: int
    block_hashes: tuple[int, ...]


@dataclass
class _PrefixState:
    num_tokens: int
    blocks: list[int]  # shared, append-only; this state owns blocks[:n_blocks]
    n_blocks: int
    tail: tuple[str, ...]  # tokens after the last full block


class PromptEncoder:
    """Encodes chat prompts incrementally, caching the state after every message prefix.

    The cache is keyed by a chained hash of the messages so far; a hit on the longest known prefix
    means only the messages after it are tokenised. ``max_entries`` bounds memory (LRU).
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self._states: OrderedDict[int, _PrefixState] = OrderedDict()
        self._max_entries = max_entries

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> EncodedPrompt:
        keys = []
        key = hash(("tools", json.dumps(tools, sort_keys=True) if tools else ""))
        keys.append(key)
        for message in messages:
            key = hash((key, _message_key(message)))
            keys.append(key)
        # Find the longest cached prefix (most requests extend the previous turn's conversation).
        start, state = 0, None
        for i in range(len(keys) - 1, -1, -1):
            state = self._states.get(keys[i])
            if state is not None:
                self._states.move_to_end(keys[i])
                start = i
                break
        if state is None:
            state = self._extend(_PrefixState(0, [], 0, ()), tools_tokens(tools))
            self._remember(keys[0], state)
        for i in range(start, len(messages)):
            state = self._extend(state, message_tokens(messages[i]))
            self._remember(keys[i + 1], state)
        final = self._extend(state, list(_REPLY_MARKER))
        return EncodedPrompt(final.num_tokens, tuple(final.blocks[: final.n_blocks]))

    def _remember(self, key: int, state: _PrefixState) -> None:
        self._states[key] = state
        if len(self._states) > self._max_entries:
            self._states.popitem(last=False)

    @staticmethod
    def _extend(state: _PrefixState, tokens: list[str]) -> _PrefixState:
        pending = list(state.tail) + tokens
        blocks = state.blocks
        if len(blocks) != state.n_blocks:  # another continuation already appended: branch off
            blocks = blocks[: state.n_blocks]
        parent = blocks[-1] if blocks else 0
        full = len(pending) // BLOCK_SIZE * BLOCK_SIZE
        for i in range(0, full, BLOCK_SIZE):
            parent = hash((parent, tuple(pending[i : i + BLOCK_SIZE])))
            blocks.append(parent)
        return _PrefixState(state.num_tokens + len(tokens), blocks, len(blocks), tuple(pending[full:]))


def _message_key(message: Mapping[str, Any]) -> tuple:
    calls = message.get("tool_calls")
    return (
        message.get("role"),
        _content_text(message.get("content")),
        message.get("reasoning_content") or message.get("reasoning") or "",
        json.dumps(calls, sort_keys=True) if calls else "",
    )

"""Reader for Mooncake traces (kvcache-ai/Mooncake ``FAST25-release/traces/*.jsonl``).

A line is one request: ``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids``, the
ids of the prompt's 512-token blocks (equal leading ids = a reusable prefix). There is no text and no
session id, so both are rebuilt here.

Text: every block id gets deterministic filler (seeded by file name and id) as one user message of
``BLOCK_CONTENT_TOKENS`` tokens, which with the chat template's role marker is exactly one
512-token block of prompt. The last block is trimmed so the prompt is ``input_length`` tokens. Two
requests sharing leading hash ids therefore send byte-identical leading messages, and a prefix cache
sees exactly the reuse the trace recorded, within a session and across sessions.

Sessions: requests are taken in timestamp order. A request continues a session when the session's
latest request's *complete* blocks (its hash ids, less a trailing partial block, whose id changes
once the conversation grows) are all leading ids of the new request; the longest such match wins,
then the most recent. A session is a chain: once continued, its previous request can't be continued
again (a second match starts a new session, still sharing the prefix text). A request with no
complete block (under 512 tokens) can't be continued. The rule is a heuristic: a request whose
complete blocks are only a prefix that many sessions share (a common system prompt) can be continued
by another session's request (5 % of requests got a wrong predecessor in a synthetic check of
2,000 six-request sessions sharing a 3-block prompt); the text, and so the prefix-cache reuse, is
exact either way.

Tool wait: the gap from a request's timestamp to its session's next request, capped at
``MAX_TOOL_WAIT_S``. The gap also holds the request's own service time, which the trace does not
record; nothing is subtracted for it. The last request of a session waits 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agentperf_users.tokens import TEMPLATE_OVERHEAD
from agentperf_users.workload.readers.common import (
    REPLY_TOKENS,
    fail,
    got,
    json_lines,
    require_int,
    require_list,
    require_number,
)
from agentperf_users.workload.textgen import filler_pieces
from agentperf_users.workload.trajectory import (
    MAX_CONTEXT_TOKENS,
    MAX_OUTPUT_TOKENS,
    Trajectory,
    Turn,
    TurnShape,
)

MOONCAKE_BLOCK_TOKENS = 512
BLOCK_CONTENT_TOKENS = MOONCAKE_BLOCK_TOKENS - TEMPLATE_OVERHEAD
MAX_TOOL_WAIT_S = 10.0
"""Cap on a rebuilt tool wait: longer gaps are human think time or idle sessions, not tool calls (the
same 10 s cap as SemiAnalysis' AgentX replay rules)."""
MS_PER_S = 1000.0
MAX_TIMESTAMP_MS = 1e15
"""Latest timestamp accepted (ms; some 31,000 years): any clock's, relative or epoch, is far below."""


@dataclass(frozen=True)
class _Request:
    hash_ids: tuple[int, ...]
    input_length: int
    output_length: int
    timestamp_ms: float

    @property
    def complete_blocks(self) -> int:
        return self.input_length // MOONCAKE_BLOCK_TOKENS

    def block_sizes(self) -> list[int]:
        """Content tokens of each block message; the last is trimmed to make ``input_length``."""
        sizes = [BLOCK_CONTENT_TOKENS] * len(self.hash_ids)
        rest = self.input_length - MOONCAKE_BLOCK_TOKENS * (len(self.hash_ids) - 1)
        sizes[-1] = max(0, rest - TEMPLATE_OVERHEAD - REPLY_TOKENS)
        return sizes

    def prompt_tokens(self) -> int:
        return sum(self.block_sizes()) + TEMPLATE_OVERHEAD * len(self.hash_ids) + REPLY_TOKENS


@dataclass(frozen=True)
class MooncakePlan:
    id: str
    seed_prefix: str
    requests: tuple[_Request, ...]
    shapes: tuple[TurnShape, ...]

    def build(self) -> Trajectory:
        full_pieces: dict[int, list[str]] = {}
        messages: dict[tuple[int, int], dict] = {}

        def block_message(block_id: int, size: int) -> dict:
            message = messages.get((block_id, size))
            if message is None:
                pieces = full_pieces.get(block_id)
                if pieces is None:
                    pieces = full_pieces[block_id] = filler_pieces(BLOCK_CONTENT_TOKENS, f"{self.seed_prefix}/{block_id}")
                message = messages[(block_id, size)] = {"role": "user", "content": "".join(pieces[:size])}
            return message

        turns = []
        for request, shape in zip(self.requests, self.shapes):
            blocks = tuple(block_message(b, n) for b, n in zip(request.hash_ids, request.block_sizes()))
            turns.append(Turn(blocks, (), shape.output_tokens, shape.tool_wait_s, shape.prompt_tokens))
        return Trajectory(self.id, tuple(turns))


def read_mooncake(files: Sequence[Path]) -> list[MooncakePlan]:
    plans: list[MooncakePlan] = []
    for path in files:
        stem = path.name.split(".")[0]
        requests = sorted(_read_requests(path), key=lambda r: r.timestamp_ms)
        for number, session in enumerate(_sessions(requests)):
            shapes = []
            for i, request in enumerate(session):
                gap_ms = session[i + 1].timestamp_ms - request.timestamp_ms if i + 1 < len(session) else 0.0
                shapes.append(TurnShape(request.prompt_tokens(), request.output_length, min(gap_ms / MS_PER_S, MAX_TOOL_WAIT_S)))
            plans.append(MooncakePlan(f"{stem}-{number:05d}", f"mooncake/{stem}", tuple(session), tuple(shapes)))
    return plans


def _read_requests(path: Path) -> list[_Request]:
    requests = []
    for number, obj in json_lines(path):
        where = f"{path}:{number}"
        timestamp_ms = require_number(obj, "timestamp", where, maximum=MAX_TIMESTAMP_MS)
        input_length = require_int(obj, "input_length", where, minimum=1, maximum=MAX_CONTEXT_TOKENS)
        output_length = require_int(obj, "output_length", where, minimum=1, maximum=MAX_OUTPUT_TOKENS)
        hash_ids = require_list(obj, "hash_ids", where, non_empty=True)
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in hash_ids):
            fail(where, f"hash_ids must be a list of integers, got {got(hash_ids)}")
        expected = math.ceil(input_length / MOONCAKE_BLOCK_TOKENS)
        if len(hash_ids) != expected:
            fail(where, f"hash_ids must have ceil(input_length / {MOONCAKE_BLOCK_TOKENS}) = {expected} ids, "
                        f"got {len(hash_ids)}")
        requests.append(_Request(tuple(hash_ids), input_length, output_length, timestamp_ms))
    return requests


def _sessions(requests: Sequence[_Request]) -> list[list[_Request]]:
    """Chain requests into sessions by shared hash-id prefixes (the rule in the module docstring)."""
    sessions: list[list[_Request]] = []
    # Open session tails by a hash of their complete-block prefix; candidates are verified exactly.
    tails: dict[int, list[int]] = {}
    for request in requests:
        keys = _prefix_keys(request.hash_ids)
        chosen = None
        for length in range(len(request.hash_ids), 0, -1):
            for position in range(len(tails.get(keys[length - 1], ())) - 1, -1, -1):
                session = tails[keys[length - 1]][position]
                tail = sessions[session][-1]
                if tail.hash_ids[: tail.complete_blocks] == request.hash_ids[:length]:
                    chosen = session
                    del tails[keys[length - 1]][position]
                    break
            if chosen is not None:
                break
        if chosen is None:
            chosen = len(sessions)
            sessions.append([])
        sessions[chosen].append(request)
        if request.complete_blocks:
            tails.setdefault(keys[request.complete_blocks - 1], []).append(chosen)
    return sessions


def _prefix_keys(hash_ids: tuple[int, ...]) -> list[int]:
    keys, key = [], 0
    for block_id in hash_ids:
        key = hash((key, block_id))
        keys.append(key)
    return keys

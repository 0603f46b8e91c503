"""Chat request bodies built from per-message JSON encoded once per trajectory.

An agent resends its whole conversation every turn. Re-encoding all of it each time would make the load
generator's CPU per turn grow with the context, and a busy client adds its own delay to what it measures;
kept apart from the client because the agent, not the HTTP layer, knows when a conversation starts over.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence


class ChatBodyEncoder:
    """Builds request bodies by joining per-message JSON encoded once.

    An agent resends its whole conversation every turn, and consecutive turns share their message
    objects, so each message dict is encoded the first time it is seen (keyed by identity; the cache
    keeps the object alive, so an identity is never reused while cached) and a turn costs one join.
    Call :meth:`clear` when the agent starts another trajectory.
    """

    def __init__(self) -> None:
        self._encoded: dict[int, tuple[Any, bytes]] = {}

    def clear(self) -> None:
        self._encoded.clear()

    def _encode(self, value: Any) -> bytes:
        hit = self._encoded.get(id(value))
        if hit is None or hit[0] is not value:
            hit = (value, json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
            self._encoded[id(value)] = hit
        return hit[1]

    def body(self, params: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()) -> bytes:
        """``params`` (model, stream, limits, ...) plus ``messages`` and, when given, ``tools``."""
        head = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
        parts = [head[:-1], b"," if len(head) > 2 else b"", b'"messages":[', b",".join(map(self._encode, messages)), b"]"]
        if tools:
            parts += [b',"tools":', self._encode(tools)]
        parts.append(b"}")
        return b"".join(parts)

"""What a chat completion request may say and how errors look on the wire (vLLM's OpenAI server).

Why a module of its own: validating a request body and shaping an error are pure functions of bytes,
shared by the HTTP layer (malformed requests), the routes, and replies that fail mid-stream; keeping them
here leaves the server with only the request lifecycle. Errors use OpenAI's shape with vLLM's types; one
raised after a stream's headers went out is sent in-band (see :class:`~.reply.Reply`).

Request fields beyond OpenAI's:

``ignore_eos`` (vLLM)
    Generate exactly the limit (``max_completion_tokens``, else ``max_tokens``, else the context room
    left). Without it the length is ``engine.sample_output_tokens(limit)``.
``agentperf_timing``
    The usage chunk (sent even without ``stream_options.include_usage``), or a whole response's
    ``usage``, carries ``agentperf_timing: {arrival, token_times, send_times}``: ``time.monotonic()``
    seconds of the arrival, of each token's intended (engine) time, and of when its bytes were written.
``agentperf_reasoning_share``
    Share (0-1) of the output tokens streamed first as ``reasoning_content`` (and ``reasoning``) deltas;
    defaults to ``ServerOptions.reasoning_share``.
``tool_choice``
    With ``tools``: ``"required"`` or a named function makes the answer a tool call, ``"none"`` never,
    ``"auto"`` (the default) with probability ``ServerOptions.tool_call_probability``. A tool call
    streams a header delta (index, id, type, function name, empty arguments), then argument fragments,
    and ends with ``finish_reason: tool_calls``. One output token is one delta in every case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def payload(self) -> bytes:
        kind = _ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.status}
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class ChatParams:
    """The fields of a chat completion request the simulator acts on, validated."""

    model: str | None
    messages: tuple[dict, ...]
    tools: tuple[dict, ...]
    tool_names: tuple[str, ...]  # ``function.name`` of each of ``tools``
    stream: bool
    include_usage: bool
    max_tokens: int | None
    ignore_eos: bool
    tool_choice: str | None  # "none", "auto", "required", or the name of a forced function
    timing: bool
    reasoning_share: float | None

    @classmethod
    def parse(cls, body: bytes) -> "ChatParams":
        """Validate a request body; raises :class:`ApiError` (400) naming the offending field."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the decoder goes
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
                raise ApiError(400, f"messages[{i}] must be an object with a role in {sorted(MESSAGE_ROLES)}", "messages")
        tools = tuple(_optional(data, "tools", list) or ())
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ApiError(400, f"tools[{i}] must be an object with function.name", "tools")
        choice = data.get("tool_choice")
        if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
            choice = choice["function"]["name"]
        names = tuple(tool["function"]["name"] for tool in tools)
        if choice not in (None, "none", "auto", "required", *names) or (choice == "required" and not names):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or a function named in tools', "tool_choice")
        limit_key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = data.get(limit_key)
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
            raise ApiError(400, f"{limit_key} must be a positive integer, got {max_tokens!r}", limit_key)
        if data.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        share = _optional(data, "agentperf_reasoning_share", (int, float))
        if share is not None and not 0 <= share <= 1:
            raise ApiError(400, "agentperf_reasoning_share must be between 0 and 1", "agentperf_reasoning_share")
        stream_options = _optional(data, "stream_options", dict) or {}
        return cls(
            model=_optional(data, "model", str),
            messages=tuple(messages),
            tools=tools,
            tool_names=names,
            stream=bool(_optional(data, "stream", bool)),
            include_usage=bool(_optional(stream_options, "include_usage", bool)),
            max_tokens=max_tokens,
            ignore_eos=bool(_optional(data, "ignore_eos", bool)),
            tool_choice=choice,
            timing=bool(_optional(data, "agentperf_timing", bool)),
            reasoning_share=share,
        )


def _optional(data: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    """``data[key]`` if present and of ``kind`` (a bool is not a number), else ``None``; wrong kinds raise 400."""
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        names = kind.__name__ if isinstance(kind, type) else "number"
        raise ApiError(400, f"{key} must be of type {names}", key)
    return value

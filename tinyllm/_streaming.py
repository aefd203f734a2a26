"""Assembling a streamed chat completion: chunks in, text deltas out, one message dict at the end.

The chunks are OpenAI's ``chat.completion.chunk`` objects as plain dicts (what the
server-sent events carry, and what llama-cpp-python's ``create_chat_completion(stream=True)``
yields)::

    {"model": ..., "choices": [{"index": 0, "delta": {"role"?, "content"?, "tool_calls"?, "refusal"?},
                                "finish_reason": None | "stop" | "length" | "tool_calls" | ...}],
     "usage": None | {...}}         # usage only in the last chunk, with stream_options.include_usage

With ``n`` choices, each chunk's choices carry their ``index``: choice 0 is the reply (its text
deltas are what iterating a stream yields); the others are folded apart, one Accumulator
each, and come back from :meth:`Accumulator.choices`. With ``logprobs=True`` each choice's
``logprobs.content`` tokens are appended as they come.

Tool-call deltas arrive in pieces keyed by ``index``: the first piece of a call
carries its ``id``, ``type`` and ``function.name``; later pieces append to
``function.arguments``. :class:`Accumulator` puts them together.
"""

from __future__ import annotations

from typing import Any

from .errors import ResponseError

__all__ = ["Accumulator", "partial_json"]


class Accumulator:
    """Folds stream chunks into the reply: ``add(chunk)`` returns the chunk's text delta (str, maybe "").

    Attributes:
        text: the content so far.
        model: the model named by the chunks (None until one does).
        finish_reason: the last choice's finish_reason (None until it comes).
        usage: the server's usage dict when it sent one, else None.
        logprobs: choice 0's tokens with their log probabilities so far (a list of
            ``{"token", "logprob", "bytes", "top_logprobs"}``), or None when none came.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._refusal: list[str] = []
        self._tool_calls: dict[int, dict] = {}
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.chunks = 0
        self.logprobs: list | None = None
        self._others: dict[int, Accumulator] = {}  # choices other than 0 (n > 1), by index

    @property
    def text(self) -> str:
        """The content received so far."""
        return "".join(self._parts)

    def add(self, chunk: Any) -> str:
        """Take one chunk; return its text delta.

        Raises:
            ResponseError: the chunk is not a JSON object of the chunk shape.
        """
        if not isinstance(chunk, dict):
            raise ResponseError(f"stream chunk is not a JSON object: {str(chunk)[:200]!r}", raw=chunk)
        self.chunks += 1
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise ResponseError("stream chunk has malformed choices", raw=chunk)
        delta_text = ""
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if index != 0:  # another of n choices: folded apart
                if isinstance(index, int):
                    self._others.setdefault(index, Accumulator()).add({"choices": [{**choice, "index": 0}]})
                continue
            found = choice.get("logprobs")
            if isinstance(found, dict) and isinstance(found.get("content"), list):
                self.logprobs = (self.logprobs or []) + found["content"]
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise ResponseError("stream chunk has a malformed delta", raw=chunk)
            content = delta.get("content")
            if content is not None:
                if not isinstance(content, str):
                    raise ResponseError(f"stream delta content is {type(content).__name__}, not text", raw=chunk)
                self._parts.append(content)
                delta_text += content
            if isinstance(delta.get("refusal"), str):
                self._refusal.append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                self._add_tool_call(call, chunk)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return delta_text

    def _add_tool_call(self, piece: Any, chunk: Any) -> None:
        if not isinstance(piece, dict):
            raise ResponseError("stream chunk has a malformed tool call", raw=chunk)
        index = piece.get("index", len(self._tool_calls))
        call = self._tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if piece.get("id"):
            call["id"] = piece["id"]
        if piece.get("type"):
            call["type"] = piece["type"]
        function = piece.get("function") or {}
        if isinstance(function, dict):
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]

    def message(self) -> dict:
        """The assembled message dict (``role``, ``content``; ``tool_calls`` and ``refusal`` when sent).

        Raises:
            ResponseError: the stream carried no chunk.
        """
        if not self.chunks:
            raise ResponseError("the stream ended before any chunk arrived")
        # content stays None when no delta carried any (a refusal, tool calls only), as in a non-streamed reply
        message: dict[str, Any] = {"role": "assistant", "content": self.text if self._parts else None}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        if self._refusal:
            message["refusal"] = "".join(self._refusal)
        return message

    def choices(self) -> list[dict] | None:
        """Every choice, ``[{"index", "message", "finish_reason", "logprobs"}, ...]`` in index order,
        when the stream carried more than one (``n``); None for one.

        Raises:
            ResponseError: a choice carried nothing (see :meth:`message`).
        """
        if not self._others:
            return None
        out = [{"index": 0, "message": self.message(), "finish_reason": self.finish_reason, "logprobs": self.logprobs}]
        for index in sorted(self._others):
            other = self._others[index]
            out.append(
                {
                    "index": index,
                    "message": other.message(),
                    "finish_reason": other.finish_reason,
                    "logprobs": other.logprobs,
                }
            )
        return out


def partial_json(text: str) -> Any:
    """The JSON value parsed so far from a growing JSON ``text`` (pydantic-core's partial parsing).

    Returns None while nothing parses yet (e.g. before the first ``{``), or when the
    text is not JSON (a reply wrapped in prose parses only at the end).
    """
    from pydantic_core import from_json

    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        return from_json(text[start:], allow_partial=True)
    except ValueError:
        return None

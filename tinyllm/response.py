"""Response: one call's complete record, what ``LLMCall.respond`` / ``LLMChat.respond`` return.

A call may take several replies (output retries: a reply that did not fit the
output type is asked for again), each of which may take several HTTP attempts
(retries). The Response sums usage over all of them and keeps the last reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Response"]

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(eq=False)
class Response:
    """One call's complete record.

    Attributes:
        messages: the rendered messages sent (``list[dict]``; the first request's
            conversation, before any output-retry turns).
        message: the last reply's message dict (``role``, ``content``, and
            ``tool_calls`` / ``refusal`` when sent), or None before a reply.
        value: the reply's content coerced to the call's output_type (``str`` by default).
        usage: ``{"prompt_tokens", "completion_tokens", "total_tokens"}`` (ints),
            summed over retries and output retries as the API reported them
            (cache hits report the stored reply's usage).
        model: the model that answered (the server's ``model``), else the one asked for.
        finish_reason: ``"stop"``, ``"length"`` (the reply was cut at max_tokens),
            ``"tool_calls"``, ... or None when the backend did not say.
        cached: every reply came from the cache.
        latency: seconds from the call to the complete answer.
        time_to_first_token: seconds to the first text delta of a streamed call; None otherwise.
        retries: extra HTTP attempts, summed over the replies.
        output_retries: replies asked for again because they did not fit the output type.
        api_type: the client that answered (``openai``, ``llamacpp``, ...).
        template: the system template's name, or None (a chat without templates).
        variables: the template variables of the call (``dict``).
        cost: USD summed over the replies (:mod:`tinyllm.pricing`; a cached reply costs 0.0),
            or None when a reply's price is unknown (a local model) or no reply came.
        prompt: the loaded :class:`~tinyllm.templates.Prompt` the messages were rendered
            from (its files' paths and hash go to the call log), or None.
    """

    messages: list[dict]
    message: dict | None = None
    value: Any = None
    usage: dict = field(default_factory=lambda: dict.fromkeys(_USAGE_FIELDS, 0))
    model: str | None = None
    finish_reason: str | None = None
    cached: bool = False
    latency: float | None = None
    time_to_first_token: float | None = None
    retries: int = 0
    output_retries: int = 0
    api_type: str | None = None
    template: str | None = None
    variables: dict = field(default_factory=dict)
    cost: float | None = None
    prompt: Any = field(default=None, repr=False)
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _replies: int = field(default=0, repr=False)

    @property
    def text(self) -> str:
        """The last reply's text content (``""`` when it had none, e.g. tool calls only)."""
        content = (self.message or {}).get("content")
        return content if isinstance(content, str) else ""

    def add_reply(self, reply: Any) -> None:
        """Fold one :class:`tinyllm.clients.base.Reply` into this record (usage summed, last one kept)."""
        for name in _USAGE_FIELDS:
            self.usage[name] = self.usage.get(name, 0) + int(reply.usage.get(name) or 0)
        cost = getattr(reply, "cost", None)
        self.cost = cost if self._replies == 0 else (None if self.cost is None or cost is None else self.cost + cost)
        self.cached = reply.cached if self._replies == 0 else (self.cached and reply.cached)
        self.output_retries = self._replies
        self._replies += 1
        self.message = reply.message
        self.model = reply.model
        self.finish_reason = reply.finish_reason
        self.retries += reply.retries
        self.api_type = reply.api_type

    def finish(self, value: Any) -> "Response":
        """Set the typed value and the latency; returns self."""
        self.value = value
        self.latency = time.perf_counter() - self._started
        return self

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data (``value`` as given: a pydantic value is dumped)."""
        value = self.value
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        return {
            "text": self.text, "value": value, "message": self.message, "messages": self.messages,
            "usage": dict(self.usage), "model": self.model, "finish_reason": self.finish_reason,
            "cached": self.cached, "latency": self.latency, "time_to_first_token": self.time_to_first_token,
            "retries": self.retries, "output_retries": self.output_retries, "api_type": self.api_type,
            "template": self.template, "variables": self.variables, "cost": self.cost,
        }

"""Response: one call's complete record, what ``LLMCall.respond`` / ``LLMChat.respond`` return.

A call may take several replies (output retries: a reply that did not fit the
output type is asked for again), each of which may take several HTTP attempts
(retries). The Response sums usage over all of them and keeps the last reply.

``LLMCall.stream`` / ``astream`` return a Response that yields the reply's text
deltas (``str``) as it is iterated (``for`` / ``async for``) and is complete once
the iteration ends; :attr:`Response.partial` is the JSON value parsed so far.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

__all__ = ["Response", "Choice"]

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_DETAIL_FIELDS = ("prompt_tokens_details", "completion_tokens_details")


@dataclass(eq=False)
class Choice:
    """One of a reply's choices (``n=3`` asks for three).

    Attributes:
        index: its place among the choices (0 first).
        message: its message dict (``role``, ``content``; ``tool_calls`` / ``refusal`` when sent).
        finish_reason: ``"stop"``, ``"length"``, ``"content_filter"``, ... or None when not reported.
        logprobs: its tokens with their log probabilities when asked for (``logprobs=True``):
            ``[{"token": str, "logprob": float, "bytes": list[int] | None, "top_logprobs": [...]}, ...]``
            as the API sends them; None otherwise.
        value: its content coerced to the call's output_type, once the call is complete.
    """

    index: int
    message: dict
    finish_reason: str | None = None
    logprobs: list | None = None
    value: Any = None

    @property
    def text(self) -> str:
        """The choice's text content (``""`` when it has none)."""
        content = self.message.get("content")
        return content if isinstance(content, str) else ""


@dataclass(eq=False)
class Response:
    """One call's complete record.

    Attributes:
        messages: the rendered messages sent (``list[dict]``; the first request's
            conversation, before any output-retry turns).
        message: the last reply's message dict (``role``, ``content``, and
            ``tool_calls`` / ``refusal`` when sent), or None before a reply.
        value: the reply's content coerced to the call's output_type (``str`` by default); with the
            parameter ``n`` given, the list of every choice's value (``n`` values, in index order).
        choices: the last reply's choices (``list[Choice]``: message, finish reason, logprobs, value
            each); one unless ``n`` asked for more.
        logprobs: the first choice's tokens with their log probabilities when asked for
            (``logprobs=True``, ``top_logprobs=k``): ``[{"token", "logprob", "bytes",
            "top_logprobs"}, ...]`` as the API sends them (streamed calls too); None otherwise.
            See also :attr:`label_probability`.
        usage: ``{"prompt_tokens", "completion_tokens", "total_tokens"}`` (ints),
            summed over retries and output retries as the API reported them
            (cache hits report the stored reply's usage); with
            ``prompt_tokens_details`` (``cached_tokens`` read from a prompt cache,
            ``cache_creation_tokens`` written to one) and ``completion_tokens_details``
            (``reasoning_tokens``) summed too when the server reports them; for a reply from a Batch API
            batch also ``"batch": {"id": the batch id, "price": "batch" | "half" | None}``.
        model: the model that answered (the server's ``model``), else the one asked for.
        finish_reason: ``"stop"``, ``"length"`` (the reply was cut at max_tokens),
            ``"tool_calls"``, ... or None when the backend did not say.
        cached: every reply came from the cache.
        latency: seconds from the call to the complete answer.
        time_to_first_token: seconds to the first text delta of a streamed call; None otherwise.
        retries: extra HTTP attempts, summed over the replies.
        output_retries: replies asked for again because they did not fit the output type.
        tool_rounds: the tool rounds of the call (``list[tinyllm.tools.ToolRound]``: each
            reply that asked for tools, the calls run for it with their arguments, results,
            errors and durations); usage above includes every round's reply.
        api_type: the api_type of the client that answered (``openai``, ``llamacpp``, ...).
        client: the :class:`~tinyllm.Client` object that answered the last reply (with fallbacks,
            the one that did), or None before a reply.
        attempts: with fallbacks, every failed try of a client during the call, in order
            (``list[tinyllm.clients._chain.Attempt]``: client, api_type, model, error, latency);
            empty when the first client answered every request.
        template: the system template's name, or None (a chat without templates).
        variables: the template variables of the call (``dict``).
        cost: USD summed over the replies (:mod:`tinyllm.observe._pricing`; a cached reply costs 0.0),
            or None when a reply's price is unknown (a local model) or no reply came.
        prompt: the loaded :class:`~tinyllm.prompts.Prompt` the messages were rendered
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
    usage_counted_locally: bool = False
    cost: float | None = None
    prompt: Any = field(default=None, repr=False)
    tool_rounds: list = field(default_factory=list)
    client: Any = field(default=None, repr=False)
    attempts: list = field(default_factory=list)
    choices: list = field(default_factory=list)
    logprobs: list | None = None
    _output_type: Any = field(default=None, repr=False)
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _replies: int = field(default=0, repr=False)
    _stream: Any = field(default=None, repr=False)
    _on_done: Callable[["Response"], None] | None = field(default=None, repr=False)
    _parts: list = field(default_factory=list, repr=False)
    _observer: Any = field(default=None, repr=False)  # the call log's watch on a stream (observe/_calllog.py)

    @property
    def text(self) -> str:
        """The reply's text content (``""`` when it had none, e.g. tool calls only); while
        streaming, the text received so far."""
        if self.message is None:
            return "".join(self._parts)
        content = self.message.get("content")
        return content if isinstance(content, str) else ""

    @property
    def label_probability(self) -> float | None:
        """The probability (0..1) the model gave the label it chose, for a label output type
        (a list of labels, a ``Literal`` or an ``Enum``) called with ``logprobs=True``.

        It is ``exp`` of the sum of the log probabilities of the reply's tokens that cover the
        label's text in the reply (found case-insensitively, as the label was matched; tokens
        that only partly overlap it count whole). A reply that is exactly the label gives the
        probability of the whole reply. None when the call has no label output type, no
        logprobs, or the label's text cannot be found in the reply.
        """
        from .output import label_span

        if not self.logprobs or self.message is None:
            return None
        span = label_span(self.text, self._output_type)
        if span is None:
            return None
        start, end = span
        total, at = 0.0, 0
        for token in self.logprobs:
            piece = token.get("token") if isinstance(token, dict) else None
            logprob = token.get("logprob") if isinstance(token, dict) else None
            if not isinstance(piece, str) or not isinstance(logprob, (int, float)):
                return None
            if at < end and at + len(piece) > start:
                total += logprob
            at += len(piece)
        return math.exp(total)

    @property
    def tool_calls(self) -> list:
        """Every tool call run during the call, over all rounds (``list[tinyllm.tools.ToolCall]``)."""
        return [call for r in self.tool_rounds for call in r.calls]

    @property
    def tool_messages(self) -> list[dict]:
        """The messages the tool rounds added to the conversation (assistant tool requests and ``tool`` results)."""
        return [m for r in self.tool_rounds for m in r.messages]

    @property
    def done(self) -> bool:
        """Whether the record is complete (always, except for a stream not yet read to its end)."""
        return self.latency is not None

    @property
    def partial(self) -> Any:
        """The JSON value parsed from the text so far (pydantic-core's partial JSON parsing):
        a growing ``dict`` / ``list`` while a JSON reply streams, the final value's JSON
        once done; None while nothing parses yet."""
        from ._streaming import partial_json

        return partial_json(self.text)

    # -- streaming -------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        """Text deltas as they arrive (a complete Response yields its whole text once).

        Raises, at the end: OutputParseError when the reply does not fit the output
        type; during: the client's typed errors, with ``.partial`` the text so far.
        """
        if self._stream is None:
            if self.text:
                yield self.text
            return
        try:
            for delta in self._stream:
                self._delta(delta)
                yield delta
            self._complete()
        except GeneratorExit:  # the loop was left (break): the stream may be read on, closed or dropped
            raise
        except BaseException as exc:
            self._ended(exc)
            raise

    def __aiter__(self) -> AsyncIterator[str]:
        """The asyncio twin of ``__iter__`` (for ``LLMCall.astream``).

        A plain async iterator, not an async generator: dropped after a ``break`` it needs no
        closing by the event loop, so a Response dropped unfinished frees its request slot at once.
        """
        return _AsyncDeltas(self)

    def _delta(self, delta: str) -> None:
        if self.time_to_first_token is None:
            self.time_to_first_token = time.perf_counter() - self._started
        self._parts.append(delta)

    def _complete(self) -> None:
        reply, self._stream = self._stream.reply, None
        self.add_reply(reply)
        self.usage_counted_locally = bool(reply.usage.get("counted_locally"))
        self.cached = reply.cached
        if self._on_done is not None:
            self._on_done(self)
        self._ended(None)

    def _ended(self, exc: BaseException | None) -> None:
        """Tell the call log (when it watches this stream) that the stream ended, complete or with ``exc``."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.ended(self, exc)

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop a stream early: the HTTP response is closed and the queue slot freed at once.
        Nothing is cached; the Response stays incomplete (``done`` is False). With ``LOG_CALLS`` on,
        the call is logged with the error type ``StreamClosed`` and the text received so far."""
        if self._stream is not None:
            self._stream.close()
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.closed(self)

    async def aclose(self) -> None:
        """The asyncio twin of :meth:`close`."""
        if self._stream is not None:
            await self._stream.aclose()
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.closed(self)

    def add_reply(self, reply: Any) -> None:
        """Fold one :class:`tinyllm.clients._base.Reply` into this record (usage summed, last one kept)."""
        usage, got = self.usage, reply.usage
        for name in _USAGE_FIELDS:
            value = got.get(name)
            if isinstance(value, int):
                usage[name] = usage.get(name, 0) + value
        for name in _DETAIL_FIELDS:  # cached / cache-written / reasoning tokens, when the server reports them
            details = got.get(name)
            if isinstance(details, dict):
                summed = usage.setdefault(name, {})
                for key, value in details.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        summed[key] = summed.get(key, 0) + value
        if "batch" in got:  # a Batch API reply: its batch id and how it was priced (tinyllm.batch._replay)
            usage.setdefault("batch", got["batch"])
        cost = getattr(reply, "cost", None)
        self.cost = cost if self._replies == 0 else (None if self.cost is None or cost is None else self.cost + cost)
        self.cached = reply.cached if self._replies == 0 else (self.cached and reply.cached)
        self.output_retries = self._replies - len(self.tool_rounds)
        self._replies += 1
        self.message = reply.message
        self.model = reply.model
        self.finish_reason = reply.finish_reason
        self.logprobs = reply.logprobs
        found = reply.choices or [
            {"index": 0, "message": reply.message, "finish_reason": reply.finish_reason, "logprobs": reply.logprobs}
        ]
        self.choices = [Choice(c["index"], c["message"], c.get("finish_reason"), c.get("logprobs")) for c in found]
        self.retries += reply.retries
        self.api_type = reply.api_type
        self.client = getattr(reply, "client", None)
        self.attempts.extend(getattr(reply, "attempts", None) or ())

    def finish(self, value: Any) -> "Response":
        """Set the typed value and the latency; returns self."""
        self.value = value
        self.latency = time.perf_counter() - self._started
        return self

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data (``value`` as given: a pydantic value is dumped; an image,
        audio or file variable as its repr, with its sha256 and size; the messages as sent, data URLs included)."""
        value = self.value
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        return {
            "text": self.text,
            "value": value,
            "message": self.message,
            "messages": self.messages,
            "usage": dict(self.usage),
            "model": self.model,
            "finish_reason": self.finish_reason,
            "cached": self.cached,
            "latency": self.latency,
            "time_to_first_token": self.time_to_first_token,
            "retries": self.retries,
            "output_retries": self.output_retries,
            "api_type": self.api_type,
            "usage_counted_locally": self.usage_counted_locally,
            "tool_rounds": [r.as_dict() for r in self.tool_rounds],
            "attempts": [a.as_dict() for a in self.attempts],
            "choices": [
                {
                    "index": c.index,
                    "message": c.message,
                    "finish_reason": c.finish_reason,
                    "logprobs": c.logprobs,
                    "value": c.value.model_dump(mode="json") if hasattr(c.value, "model_dump") else c.value,
                }
                for c in self.choices
            ]
            if len(self.choices) > 1
            else None,
            "logprobs": self.logprobs,
            "template": self.template,
            "variables": _plain_variables(self.variables),
            "cost": self.cost,
        }


def _plain_variables(variables: dict) -> dict:
    """``variables`` with each image, audio or file (or list of them) as its repr: name, type, size, sha256."""
    from .media import Media

    def plain(value: Any) -> Any:
        if isinstance(value, Media):
            return repr(value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, Media) for v in value):
            return [repr(v) if isinstance(v, Media) else v for v in value]
        return value

    return {k: plain(v) for k, v in variables.items()}


class _AsyncDeltas:
    """``async for delta in response``: the deltas of the Response's stream, folded into it."""

    __slots__ = ("_response", "_inner", "_whole")

    def __init__(self, response: Response) -> None:
        self._response = response
        self._inner: Any = None
        self._whole = response._stream is None  # a complete Response yields its whole text once

    def __aiter__(self) -> "_AsyncDeltas":
        return self

    async def __anext__(self) -> str:
        response = self._response
        if self._whole:
            self._whole = False
            if response._stream is None and response.text:
                return response.text
            raise StopAsyncIteration
        if response._stream is None:
            raise StopAsyncIteration
        if self._inner is None:
            self._inner = response._stream.__aiter__()
        try:
            delta = await self._inner.__anext__()
        except StopAsyncIteration:
            self._inner = None
            try:
                response._complete()
            except BaseException as exc:
                response._ended(exc)
                raise
            raise
        except BaseException as exc:
            response._ended(exc)
            raise
        response._delta(delta)
        return delta

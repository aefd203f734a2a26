"""The Batch API's two ends of the live request path: the request a row would send, and its result
answered back through the same pipeline.

:func:`batch_request` builds a row's request the way a live call builds it: the LLMCall plans the
row (template, parameters, typed-output ``response_format``, tools), the client prepares it (config
defaults, model-family adaptation, cache key, prompt count and context-window check), and the
client's own ``_request_args`` makes the JSON body, at the structured-output level the client
has learnt for that endpoint. Nothing of the body is rebuilt here.

:class:`ReplayClient` wraps the live client for the results: a row's result is answered through
the ordinary ``respond_with`` loop (reply validation, typed-output parsing, the cache, the call log,
usage and cost), with ``_chat`` returning the batch's reply instead of sending anything. It has
the live client's endpoint identity and cache, so a completed batch fills the cache under the keys
a live call reads. A second request of the same call (a tool round, an output retry) goes to the
live client, at the live price.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..clients import Client
from ..clients._fallback import JSON_SCHEMA, structured, variant
from ..config import Config
from ..errors import BatchError, ConfigError

__all__ = ["ReplayClient", "RowRequest", "batch_request", "body_hash", "check_batch_client"]


def check_batch_client(sender: Any) -> Any:
    """``sender`` if it can send Batch API requests: the ``openai`` and ``azure`` clients (request bodies
    from ``_request_args``; the SDK's files and batches APIs) and the ``anthropic`` client (bodies from
    ``_args``, i.e. :func:`tinyllm.clients._anthropic_wire.request_body`; Message Batches).

    Raises:
        ConfigError: another client (the embedded model, Ollama, a plain ``send_message`` object).
    """
    api_type = getattr(sender, "api_type", None)
    if not (
        api_type in ("openai", "azure")
        and hasattr(sender, "_request_args")
        or api_type == "anthropic"
        and hasattr(sender, "_args")
    ):
        raise ConfigError(
            f"the Batch API needs the openai, azure or anthropic client; this call uses "
            f"{getattr(sender, 'api_type', sender)!r}"
        )
    return sender


def body_hash(body: dict) -> str:
    """A short digest (16 hex digits of sha256) of a request body's canonical JSON: what a row sent."""
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _body(sender: Any, messages: list[dict], params: dict, cfg: Config) -> dict:
    """The JSON body the live client would send for the first attempt of ``messages`` / ``params``
    (resolved), at the structured-output level it has learnt for the endpoint (Anthropic: the
    Messages API body of its ``_chat``; it has one way to structured output, a forced tool call)."""
    if sender.api_type == "anthropic":
        body = sender._args(messages, params, cfg)[0]["body"]
        return json.loads(json.dumps(body, ensure_ascii=False, default=str))
    if structured(params):
        level = sender._formats.level(sender._format_endpoint(cfg, params))
        if level != JSON_SCHEMA:
            messages, params = variant(messages, params, level)
    body = sender._request_args(messages, params, cfg)["body"]
    return json.loads(json.dumps(body, ensure_ascii=False, default=str))  # plain JSON values, as the SDK would send


@dataclass
class RowRequest:
    """One row, planned: ``body`` to put in the batch file (None when ``cached``), its ``model``,
    ``prompt_tokens`` (counted locally) and ``max_tokens`` (None when unset), and the prepared
    request's ``cfg`` for pricing."""

    body: dict | None
    model: str
    prompt_tokens: int
    max_tokens: int | None
    cached: bool
    cfg: Config


def batch_request(llm: Any, variables: dict) -> RowRequest:
    """Plan ``llm`` for one row of ``variables`` as a live call would, without sending anything.

    Returns:
        :class:`RowRequest`: ``cached`` True when the cache holds a reply that fits (no body then:
        the row is answered from the cache, as a live call would be).

    Raises:
        The errors a live call raises before sending: TemplateVariableError, TemplateError,
        OutputParseError, ConfigError, BadRequestError, ContextWindowExceededError (counted locally).
    """
    from ..call import _fits

    sender, response, params, output_type, _, tools = llm._plan(variables)
    check_batch_client(sender)
    req = sender._prepare(response.messages, params, _fits(output_type, tools))
    if req.cache is not None:
        hit = req.cache.get(req.key)  # looked at, not counted: the row's own call counts it
        if hit is not None and req.accept(hit["message"]):
            return RowRequest(None, req.model, 0, None, True, req.cfg)
    sender._measure(req)
    body = _body(sender, req.messages, sender._attempt_params(req, 0), req.cfg)
    max_tokens = req.params.get("max_tokens", req.params.get("max_completion_tokens"))
    return RowRequest(body, req.model, req.prompt_tokens, max_tokens, False, req.cfg)


@dataclass
class _Pending:
    """The result waiting for a row's first request: the body hash submitted, and the decoded
    chat completion (a dict) or the error to raise in its place."""

    expected: str
    result: Any
    note: dict


class ReplayClient(Client):
    """The live client ``real`` as seen by a batch's results (one per run; not thread-safe: rows are
    answered one after the other).

    Settings are ``real``'s with no retries (``MAX_ATTEMPTS=1``: a result is what it is), no rate
    limits and no ``MAX_COST`` (the batch was paid for when it ran; ``--max-cost`` applied when it
    was submitted); the cache, endpoint identity, parameter resolution, token counting and secrets
    are ``real``'s. Its replies are priced at the batch price (``batch_pricing``).
    """

    batch_pricing = True

    def __init__(self, real: Client) -> None:
        super().__init__()
        self.real = real
        self.api_type = real.api_type
        self.capabilities = real.capabilities
        self._secrets = real._secrets
        self._pending: _Pending | None = None
        self._cfg_memo: tuple[Config | None, Config | None] = (None, None)

    def __repr__(self) -> str:
        return f"<ReplayClient of {self.real!r}>"

    def answer(self, expected: str, result: Any, note: dict) -> None:
        """Make the next request answer with ``result`` (a chat completion dict, or an exception to raise)
        if its body hashes to ``expected``; ``note`` is added to the reply's usage as ``batch``."""
        self._pending = _Pending(expected, result, note)

    # -- the live client's identity ----------------------------------------------------------
    def settings(self) -> Config:
        base = self.real.settings()
        memo = self._cfg_memo
        if memo[0] is base:
            return memo[1]  # type: ignore[return-value]
        cfg = dataclasses.replace(
            base,
            max_attempts=1,
            max_cost=None,
            requests_per_minute=0,
            tokens_per_minute=0,
            limits_backend="local",
            queue_timeout=0.0,
        )
        self._cfg_memo = (base, cfg)
        return cfg

    def cache(self, cfg: Config) -> Any:
        return self.real.cache(self.real.settings())

    def endpoint(self, cfg: Config, model: str) -> dict:
        return self.real.endpoint(self.real.settings(), model)

    def where(self, cfg: Config) -> str:
        return self.real.where(self.real.settings())  # type: ignore[attr-defined]

    def resolve_params(self, params: dict, cfg: Config) -> dict:
        return self.real.resolve_params(params, self.real.settings())

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        return self.real.count_tokens(messages, model, self.real.settings())

    def context_window(self, model: str, cfg: Config | None = None) -> int | None:
        return self.real.context_window(model, self.real.settings())

    # -- answering ------------------------------------------------------------------------------
    def request(self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any) -> Any:
        """The row's first request through the pipeline, answered by its batch result; any later
        request of the same call (tool rounds, output retries) is a live request of ``real``."""
        if self._pending is None:
            return self.real.request(messages, accept=accept, **params)
        self._row, self._pending = self._pending, None
        return super().request(messages, accept=accept, **params)

    async def arequest(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> Any:
        raise BatchError("batch results are answered synchronously")  # never used: the runner replays in one thread

    def _chat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, dict, dict]:
        row = self._row
        real_cfg = self.real.settings()
        if body_hash(_body(self.real, messages, params, real_cfg)) != row.expected:
            raise BatchError(
                "the row's request is not the one its batch sent (the template, the row or the "
                "parameters changed since it was submitted); run again to submit it anew"
            )
        if isinstance(row.result, BaseException):
            raise row.result
        if self.real.api_type == "anthropic":  # the reply is a Messages API message; typed output came as a tool call
            from ..clients._anthropic_wire import output_tool

            message, usage, info = self.real._read(row.result, output_tool(params), real_cfg)  # type: ignore[attr-defined]
        else:
            message, usage, info = self.real._read(row.result, real_cfg)  # type: ignore[attr-defined]
        return message, {**usage, "batch": row.note}, info

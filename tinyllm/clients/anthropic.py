"""The Anthropic client: Claude through Anthropic's own Messages API, on the official ``anthropic`` SDK.

``pip install 'tinyllm[anthropic]'``. The SDK is imported on first use, never at ``import tinyllm``;
its own retries are off (``max_retries=0``): tinyllm's retry loop is the only one. Requests go out
as JSON bodies through the SDK's ``post`` (its auth, headers, API version and streaming decoder
apply), built and read by :mod:`tinyllm.clients._anthropic_wire`, so the rest of tinyllm sees the
OpenAI chat shapes every client returns: ``LLMCall``/``LLMChat`` code, tools, typed output,
streaming and cost work unchanged with ``client=AnthropicClient(...)`` or ``API_TYPE=anthropic``.

Every SDK failure is mapped to the tinyllm error tree in :func:`map_error`, with API keys scrubbed
(:mod:`tinyllm.http._scrub`); the SDK's HTTP client runs on tinyllm's transport
(:func:`tinyllm.http._transport.http_client`: a deadline per attempt, credentials scrubbed from
error replies).
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from .. import models, tokens
from .._fork import reset_in_child
from ..config import API_KEY_NAMES, Config, redact_url
from ..errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    BadRequestError,
    ConfigError,
    ContextWindowExceededError,
    ResponseError,
    TinyLLMError,
    status_class,
)
from ..http._scrub import redact, redact_body
from ..http._transport import http_client
from . import _anthropic_wire as wire
from ._base import Capabilities, Client

__all__ = ["DEFAULT_BASE_URL", "AnthropicClient", "TokenCount", "error_of", "map_error"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
# Anthropic error types (https://platform.claude.com/docs/en/api/errors) -> the status they stand for,
# for an error that arrives inside a 200 stream (an SSE ``error`` event)
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
    "timeout_error": 504,
}
_TOO_LONG = ("prompt is too long", "context window", "context_length")


@dataclass(frozen=True)
class TokenCount:
    """A prompt's size in tokens, and how it was found.

    Attributes:
        tokens (int): input tokens of the messages (and tools, system) for the model.
        estimated (bool): True when counted locally (tiktoken's o200k_base, an approximation of
            Anthropic's tokenizer, which is not public); False when the API's token-counting
            endpoint (``POST /v1/messages/count_tokens``, free of charge) counted it.
        model (str): the model counted for.
    """

    tokens: int
    estimated: bool
    model: str

    def __int__(self) -> int:
        return self.tokens


def _error_parts(body: Any) -> tuple[str | None, str | None]:
    """(error type, message) of an Anthropic error body ``{"type": "error", "error": {"type", "message"}}``."""
    err = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, None
    kind, message = err.get("type"), err.get("message")
    return (kind if isinstance(kind, str) else None), (message if isinstance(message, str) else None)


def _classified(code: int, message: str, kwargs: dict[str, Any]) -> APIError:
    """The error for status ``code``: a "prompt is too long" 400/413 is a ContextWindowExceededError,
    anything else as :func:`tinyllm.errors.status_class` maps it."""
    if code in (400, 413) and any(s in message.lower() for s in _TOO_LONG):
        return ContextWindowExceededError(message, **kwargs)
    return status_class(code)(message, **kwargs)


def map_error(
    exc: BaseException, *, secrets: tuple[str, ...] = (), timeout: float | None = None, where: str = ""
) -> TinyLLMError:
    """Translate an anthropic SDK (or httpx/JSON) exception into the tinyllm error tree.

    Status codes as for the OpenAI clients: 400/413 and other 4xx -> BadRequestError ("prompt is
    too long" -> ContextWindowExceededError), 401 -> AuthenticationError, 403 ->
    PermissionDeniedError, 404 -> NotFoundError, 409 -> ConflictError, 422 ->
    UnprocessableEntityError, 429 -> RateLimitError, 5xx and 529 (``overloaded_error``) ->
    ServerError (both retried, honouring ``Retry-After``), 408 -> APIStatusError. An error event
    inside a stream (HTTP 200) is classified by its error ``type`` (``overloaded_error`` as 529,
    ``rate_limit_error`` as 429, ``api_error`` as 500, ...). Timeouts -> APITimeoutError, other
    transport failures -> APIConnectionError, an unparseable reply -> ResponseError. Keys given
    in ``secrets`` and anything shaped like a key are replaced by ``****``.
    """
    import anthropic

    if isinstance(exc, TinyLLMError):
        return exc
    if isinstance(exc, anthropic.APITimeoutError):
        return APITimeoutError(
            f"no response from {where or 'the server'} within {timeout:g} s" if timeout else "request timed out"
        )
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__ or exc
        return APIConnectionError(
            redact(f"could not reach {where or 'the server'}: {type(cause).__name__}: {cause}", secrets)
        )
    if isinstance(exc, anthropic.APIStatusError):
        body = redact_body(exc.body, secrets)
        kind, message = _error_parts(body)
        code = exc.status_code
        if code < 400 and kind:  # an error event inside a streamed 200 reply
            code = _TYPE_STATUS.get(kind, 500)
        message = redact(str(message or exc.message or f"HTTP {code}"), secrets)
        if kind:
            message = f"{message} [{kind}]"
        headers = (
            {k.lower(): redact(v, secrets) for k, v in exc.response.headers.items()} if exc.response is not None else {}
        )
        request_id = headers.get("request-id") or headers.get("x-request-id") or getattr(exc, "request_id", None)
        kwargs = {"status_code": code, "request_id": request_id, "body": body, "response_headers": headers}
        return _classified(code, message, kwargs)
    if isinstance(exc, (anthropic.APIResponseValidationError, json.JSONDecodeError, RecursionError)):
        return ResponseError(
            redact(f"malformed reply from {where or 'the server'}: {type(exc).__name__}: {exc}", secrets)
        )
    if isinstance(exc, (TypeError, ValueError)):  # raised while building or encoding the request: nothing was sent
        return BadRequestError(redact(f"cannot send this request: {type(exc).__name__}: {exc}", secrets))
    if isinstance(exc, anthropic.AnthropicError):
        return APIError(redact(str(exc), secrets))
    return TinyLLMError(
        redact(f"unexpected failure talking to {where or 'the server'}: {type(exc).__name__}: {exc}", secrets)
    )


def error_of(body: Any, *, request_id: str | None = None, secrets: tuple[str, ...] = ()) -> APIError:
    """The tinyllm error for an Anthropic error body ``{"type": "error", "error": {"type", "message"}}``
    that came with no HTTP status of its own (an ``errored`` result of a Message Batch): classified
    by its error ``type`` as :func:`map_error` classifies an error event inside a stream
    (``invalid_request_error`` -> BadRequestError, "prompt is too long" -> ContextWindowExceededError,
    ``rate_limit_error`` -> RateLimitError, ``api_error``/``overloaded_error`` -> ServerError, ...).
    API keys in ``secrets``, and anything shaped like a key, are replaced by ``****``."""
    body = redact_body(body, secrets)
    kind, message = _error_parts(body)
    code = _TYPE_STATUS.get(kind or "", 500)
    message = redact(str(message or kind or "the request failed"), secrets)
    if kind:
        message = f"{message} [{kind}]"
    kwargs = {"status_code": code, "request_id": request_id, "body": body, "response_headers": {}}
    return _classified(code, message, kwargs)


class AnthropicClient(Client):
    """Claude through Anthropic's Messages API (``api_type`` ``anthropic``).

    Args:
        api_key: the key (default: ``ANTHROPIC_API_KEY`` from the environment or .env); never
            shown in reprs, logs or errors.
        base_url: the API's address (default: ``ANTHROPIC_BASE_URL``, else https://api.anthropic.com).
        model: the model (default: ``MODEL`` when it is set, else ``ANTHROPIC_MODEL``,
            ``claude-sonnet-5-5``).
        cache, **settings: as for :class:`~tinyllm.Client` (``max_tokens``, ``timeout`` in
            seconds, ``max_attempts``, ``max_concurrent_requests``, ...).

    ``max_tokens``, which the API requires, is the call's, else the ``MAX_TOKENS`` setting, else
    the model's documented maximum output (:data:`tinyllm.models.MODELS`); for a model tinyllm does
    not know, a request without one is refused (BadRequestError) rather than given a small default.

    Raises:
        ConfigError: an unknown setting or a bad value; on use, when there is no key and no
            ``base_url`` (a loopback or proxy server may take none), or the ``anthropic`` extra is
            not installed.
    """

    api_type = "anthropic"
    # images (image_url parts become image blocks); audio and PDF file parts are not mapped
    capabilities = Capabilities(
        json_schema=True,
        json_grammar=False,
        tools=True,
        streaming=True,
        embeddings=False,
        images=True,
        audio=False,
        files=False,
    )
    api_key_secret = "ANTHROPIC_API_KEY"

    def __init__(
        self, *, api_key: str | None = None, base_url: str | None = None, cache: Any = None, **settings: Any
    ) -> None:
        super().__init__(api_key=api_key, cache=cache, base_url=base_url, **settings)
        self._fresh_sdks()
        reset_in_child(self._fresh_sdks)

    _transient = (*Client._transient, "_sdks", "_sdk_lock", "_closers")

    def _revive(self) -> None:
        self._fresh_sdks()
        reset_in_child(self._fresh_sdks)

    def _fresh_sdks(self) -> None:
        """No SDK clients yet (at start, after unpickling, and in a forked child, whose parent's
        connections must not be shared)."""
        self._sdk_lock = threading.Lock()
        self._sdks: dict[tuple, Any] = {}
        self._closers: dict[tuple, Any] = {}

    # -- settings ---------------------------------------------------------------------
    def base_url(self, cfg: Config) -> str | None:
        """The configured address (``base_url=``/``BASE_URL`` given to this client, else ``ANTHROPIC_BASE_URL``), or None."""
        return (cfg.base_url if cfg.source("BASE_URL") == "client" else None) or cfg.secret("ANTHROPIC_BASE_URL")

    def where(self, cfg: Config) -> str:
        """The server's address, for error messages and the cache key."""
        return self.base_url(cfg) or DEFAULT_BASE_URL

    def _api_key(self, cfg: Config) -> str:
        key = cfg.secret("ANTHROPIC_API_KEY")
        if key:
            return key
        if self.base_url(cfg):
            return "no-key"  # a loopback or proxy server may take any key
        raise ConfigError(
            "api_type 'anthropic' needs ANTHROPIC_API_KEY (environment or .env), or AnthropicClient(api_key=...)"
        )

    def _keys(self, cfg: Config) -> tuple[str, ...]:
        return tuple(filter(None, (cfg.secret(name) for name in API_KEY_NAMES)))

    def endpoint(self, cfg: Config, model: str) -> dict:
        return {"api_type": self.api_type, "base_url": self.where(cfg)}

    def default_model(self, cfg: Config) -> str:
        """``MODEL`` when it was set anywhere (file, environment, configure(), this client), else ``ANTHROPIC_MODEL``."""
        return cfg.model if cfg.source("MODEL") != "default" else cfg.anthropic_model

    def default_max_tokens(self, model: str) -> int | None:
        """The model's documented maximum output tokens (:data:`tinyllm.models.MODELS`), or None when unknown."""
        info = models.model_info(model)
        return info.max_output_tokens if info is not None and info.max_output_tokens else None

    def resolve_params(self, params: dict, cfg: Config) -> dict:
        """As :meth:`Client.resolve_params <tinyllm.Client.resolve_params>`, then ``max_tokens`` set:
        the call's or the setting's, else the model's documented maximum output.

        Raises:
            BadRequestError: no ``max_tokens`` anywhere and the model is not in the table.
        """
        out = super().resolve_params(params, cfg)
        if out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
            default = self.default_max_tokens(out["model"])
            if default is None:
                raise BadRequestError(
                    f"the Messages API requires max_tokens and tinyllm does not know the maximum output of "
                    f"{out['model']!r}: give max_tokens (front matter, LLMCall(max_tokens=...), or the "
                    "MAX_TOKENS setting)"
                )
            out["max_tokens"] = default
        elif "max_completion_tokens" in out and "max_tokens" not in out:
            out["max_tokens"] = out.pop("max_completion_tokens")
        return out

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        """Estimated prompt tokens (tiktoken's o200k_base; Anthropic's tokenizer is not public): what the
        pipeline uses to refuse an oversized prompt early and for TPM limits. See :meth:`token_count`
        for an exact count."""
        return tokens.count_tokens(messages, model)

    def token_count(
        self, messages: list[dict], *, model: str | None = None, exact: bool = True, **params: Any
    ) -> TokenCount:
        """Count the input tokens of ``messages`` (with ``tools``, ``system``, ... in ``params``) for ``model``.

        Args:
            messages: OpenAI-style chat messages, as for :meth:`send_message`.
            model: default: the client's model.
            exact: True: ask the API's token-counting endpoint (free; rate-limited on its own;
                through tinyllm's retry loop). False: estimate locally, offline.
            **params: request parameters that count (``tools``, ``tool_choice``, ``response_format``, ``cache``).

        Returns:
            :class:`TokenCount`; ``estimated`` says which way it was counted.

        Raises:
            BadRequestError: malformed messages; the errors of :meth:`send_message` for the API call.
        """
        from ._base import validate_messages

        cfg = self.settings()
        messages = validate_messages(messages)
        given = {
            "max_tokens": 1,
            **params,
            **({"model": model} if model else {}),
        }  # max_tokens does not count: never refused for it
        resolved = self.resolve_params(given, cfg)
        model = resolved["model"]
        if not exact:
            return TokenCount(self.count_tokens(messages, model, cfg), True, model)
        body, _ = wire.request_body(messages, resolved, resolved["max_tokens"])
        body.pop("max_tokens", None)
        for key in ("stop_sequences", "metadata", "service_tier"):
            body.pop(key, None)
        options = self._options(resolved, cfg)

        def attempt(n: int) -> int:
            sdk = self.sdk(cfg)
            try:
                reply = sdk.post("/v1/messages/count_tokens", cast_to=object, body=body, options=options)
            except Exception as exc:
                raise self._error(exc, cfg) from exc
            if not isinstance(reply, dict) or not isinstance(reply.get("input_tokens"), int):
                raise ResponseError(f"the token-counting endpoint answered {str(reply)[:200]!r}", raw=reply)
            return reply["input_tokens"]

        return TokenCount(self.retrying(cfg).call(attempt), False, model)

    # -- the SDK ----------------------------------------------------------------------
    def _make_sdk(self, cfg: Config, is_async: bool) -> Any:
        try:
            import anthropic
        except ImportError as exc:
            raise ConfigError("api_type 'anthropic' needs the anthropic SDK: pip install 'tinyllm[anthropic]'") from exc
        cls = anthropic.AsyncAnthropic if is_async else anthropic.Anthropic
        return cls(
            api_key=self._api_key(cfg),
            base_url=self.where(cfg),
            max_retries=0,
            timeout=cfg.timeout,
            http_client=http_client(is_async, sdk="anthropic"),
        )

    def sdk(self, cfg: Config, is_async: bool = False) -> Any:
        """The SDK client for these settings (memoized per address and key; an async one per event loop,
        forgotten once its loop is closed)."""
        loop = None
        if is_async:
            import asyncio

            loop = asyncio.get_running_loop()
        key = (loop, self.where(cfg), self._api_key(cfg))
        with self._sdk_lock:
            found = self._sdks.get(key)
            if found is None:
                for old in [k for k in self._sdks if k[0] is not None and k[0].is_closed()]:
                    del self._sdks[old]
                    self._closers.pop(old, None)
                found = self._sdks[key] = self._make_sdk(cfg, is_async)
                if loop is not None:  # closed on its own loop when that loop shuts down (see OpenAIClient.sdk)
                    from .openai import _close_at_loop_shutdown, _first_step

                    self._closers[key] = closer = _close_at_loop_shutdown(found)
                    loop.create_task(_first_step(closer))
            return found

    def _error(self, exc: BaseException, cfg: Config, timeout: float | None = None) -> TinyLLMError:
        from .openai import (
            _scrub_chain,  # the credential headers of the requests an SDK exception keeps
        )

        _scrub_chain(exc)
        return map_error(
            exc, secrets=self._keys(cfg), timeout=timeout or cfg.timeout, where=redact_url(self.where(cfg))
        )

    def _options(self, params: dict, cfg: Config) -> dict:
        timeout = params.get("timeout")
        if timeout is not None and not timeout > 0:
            raise BadRequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        options: dict[str, Any] = {"timeout": cfg.timeout if timeout is None else timeout}
        if params.get("extra_headers"):
            options["headers"] = params["extra_headers"]
        if params.get("extra_query"):
            options["params"] = params["extra_query"]
        return options

    def _args(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, dict | None]:
        body, out_tool = wire.request_body(messages, params, params["max_tokens"])
        return {"cast_to": object, "body": body, "options": self._options(params, cfg)}, out_tool

    def _read(self, reply: Any, out_tool: dict | None, cfg: Config) -> tuple[dict, dict, dict]:
        try:
            return wire.read_message(reply, out_tool)
        except ResponseError as exc:
            keys = self._keys(cfg)
            raise ResponseError(redact(str(exc), keys), raw=redact_body(exc.raw, keys)) from None

    # -- one request ------------------------------------------------------------------
    def _chat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, dict, dict]:
        args, out_tool = self._args(messages, params, cfg)
        try:
            reply = self.sdk(cfg).post("/v1/messages", **args)
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._read(reply, out_tool, cfg)

    async def _achat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, dict, dict]:
        args, out_tool = self._args(messages, params, cfg)
        try:
            reply = await self.sdk(cfg, is_async=True).post("/v1/messages", **args)
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._read(reply, out_tool, cfg)

    # -- streaming: the SDK's server-sent events, as OpenAI chunks --------------------------
    def _chat_stream(self, messages: list[dict], params: dict, cfg: Config) -> Iterator[dict]:
        """One streamed request: OpenAI chunk dicts of the events; closing it closes the response."""
        import anthropic

        args, out_tool = self._args(messages, params, cfg)
        args["body"]["stream"] = True
        try:
            stream = self.sdk(cfg).post("/v1/messages", **args, stream=True, stream_cls=anthropic.Stream[object])
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._chunks(stream, wire.StreamTranslator(out_tool), cfg, params)

    def _chunks(self, stream: Any, translator: wire.StreamTranslator, cfg: Config, params: dict) -> Iterator[dict]:
        try:
            for event in stream:
                yield from translator.chunks(event)
        except TinyLLMError:
            raise
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        finally:
            stream.close()

    def _achat_stream(self, messages: list[dict], params: dict, cfg: Config) -> AsyncIterator[dict]:
        """The asyncio twin of :meth:`_chat_stream` (the SDK's ``AsyncStream``)."""
        return self._achunks(messages, params, cfg)

    async def _achunks(self, messages: list[dict], params: dict, cfg: Config) -> AsyncIterator[dict]:
        import anthropic

        args, out_tool = self._args(messages, params, cfg)
        args["body"]["stream"] = True
        translator = wire.StreamTranslator(out_tool)
        try:
            stream = await self.sdk(cfg, is_async=True).post(
                "/v1/messages", **args, stream=True, stream_cls=anthropic.AsyncStream[object]
            )
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        try:
            async for event in stream:
                for chunk in translator.chunks(event):
                    yield chunk
        except TinyLLMError:
            raise
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        finally:
            await stream.close()

    def _embed(self, texts: list[str], model: str, cfg: Config) -> tuple[list[list[float]], dict]:
        raise ConfigError(
            "Anthropic has no embeddings endpoint (its docs point to Voyage AI): use another client "
            "for get_embeddings()"
        )

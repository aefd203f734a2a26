"""The OpenAI client: api.openai.com, or any OpenAI-compatible server at BASE_URL.

The SDK is imported on first use, never at ``import tinyllm``. Its own retries
are off (``max_retries=0``): tinyllm's retry loop is the only one. Every SDK
failure is mapped to the tinyllm error tree in :func:`map_error`, the one place
that does it, with API keys scrubbed from the message.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Iterator

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
from .._fork import reset_in_child
from ._base import Capabilities, Client
from ._replies import extract_reply
from ._fallback import FormatFallback, structured
from ..http._scrub import redact, redact_body
from ..http._transport import http_client, scrub_credentials

__all__ = ["OpenAIClient", "OllamaClient", "map_error", "status_error", "redact"]

_OPTION_PARAMS = frozenset({"timeout", "extra_headers", "extra_query", "extra_body"})  # not sent in the body
# tinyllm's own parameters, for other clients: ``cache`` (Anthropic prompt-caching breakpoints; OpenAI caches
# prompt prefixes by itself), never sent in an OpenAI body
_NOT_SENT = _OPTION_PARAMS | {"cache"}


def map_error(
    exc: BaseException, *, secrets: tuple[str, ...] = (), timeout: float | None = None, where: str = ""
) -> TinyLLMError:
    """Translate an openai SDK (or httpx/JSON) exception into the tinyllm error tree.

    Status codes: 400/422 and other 4xx -> BadRequestError (``context_length_exceeded``
    -> ContextWindowExceededError), 401 -> AuthenticationError, 403 ->
    PermissionDeniedError, 404 -> NotFoundError, 409 -> ConflictError, 422 ->
    UnprocessableEntityError (a BadRequestError), 429 -> RateLimitError, 5xx ->
    ServerError, 408 -> APIStatusError (openai-python's tree). Timeouts -> APITimeoutError, other transport
    failures -> APIConnectionError, an unparseable reply -> ResponseError.
    """
    import openai

    if isinstance(exc, TinyLLMError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return APITimeoutError(
            f"no response from {where or 'the server'} within {timeout:g} s" if timeout else "request timed out"
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return APIConnectionError(
            redact(f"could not reach {where or 'the server'}: {type(cause).__name__}: {cause}", secrets)
        )
    if isinstance(exc, openai.APIStatusError):
        headers = dict(exc.response.headers.items()) if exc.response is not None else {}
        return status_error(
            exc.status_code, exc.body, request_id=exc.request_id, headers=headers, fallback=exc.message, secrets=secrets
        )
    if isinstance(
        exc, (openai.APIResponseValidationError, json.JSONDecodeError, RecursionError)
    ):  # RecursionError: JSON nested too deeply
        return ResponseError(
            redact(f"malformed reply from {where or 'the server'}: {type(exc).__name__}: {exc}", secrets)
        )
    if isinstance(exc, (TypeError, ValueError)):  # raised while building or encoding the request: nothing was sent
        return BadRequestError(redact(f"cannot send this request: {type(exc).__name__}: {exc}", secrets))
    if isinstance(exc, openai.OpenAIError):
        return APIError(redact(str(exc), secrets))
    return TinyLLMError(
        redact(f"unexpected failure talking to {where or 'the server'}: {type(exc).__name__}: {exc}", secrets)
    )


def status_error(
    code: int,
    body: Any,
    *,
    request_id: str | None = None,
    headers: dict | None = None,
    fallback: str | None = None,
    secrets: tuple[str, ...] = (),
) -> APIError:
    """The tinyllm error for an HTTP error answer: status ``code`` and its decoded JSON ``body`` (an
    OpenAI-style ``{"error": {"message", "code", ...}}`` or anything else), as :func:`map_error` maps
    them; also used for the per-request errors of a Batch API error file. API keys are scrubbed
    from the message, the body and the ``headers``."""
    body = redact_body(body, secrets)
    err = body.get("error", body) if isinstance(body, dict) else body
    message = err.get("message") if isinstance(err, dict) else None
    message = redact(str(message or fallback or f"HTTP {code}"), secrets)
    err_code = err.get("code") if isinstance(err, dict) else None
    headers = {str(k).lower(): redact(str(v), secrets) for k, v in (headers or {}).items()}
    kwargs = dict(status_code=code, request_id=request_id, body=body, response_headers=headers)
    if err_code == "context_length_exceeded":
        return ContextWindowExceededError(message, **kwargs)
    return status_class(code)(message, **kwargs)


def _scrub_chain(exc: BaseException | None) -> None:
    """Blank the credential headers of every sent request held by ``exc`` and the exceptions chained to it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        try:
            request = getattr(exc, "request", None)
        except RuntimeError:  # httpx: "The .request property has not been set."
            request = None
        if request is not None and hasattr(request, "headers"):
            scrub_credentials(request)
        exc = exc.__cause__ or exc.__context__


async def _close_at_loop_shutdown(sdk: Any) -> Any:
    """An async generator that waits at its ``yield`` until its loop shuts down
    async generators (``loop.shutdown_asyncgens()``, run by ``asyncio.run``), then
    closes ``sdk``'s connections while that loop still runs."""
    try:
        yield
    finally:
        await sdk.close()


async def _first_step(agen: Any) -> None:
    await agen.__anext__()  # the loop's first-iteration hook registers it for shutdown


class OpenAIClient(Client):
    """OpenAI's API, or any OpenAI-compatible server when ``BASE_URL`` / ``OPENAI_BASE_URL`` is set.

    Args:
        base_url: the server's URL (default: ``BASE_URL``, ``OPENAI_BASE_URL``, then OpenAI's).
        api_key: the key (default: ``OPENAI_API_KEY`` from the environment or .env).
            A server at a custom base URL may need no key; then a placeholder is sent.
        cache, **settings: as for :class:`~tinyllm.Client` (``model``, ``timeout``,
            ``max_attempts``, ``max_concurrent_requests``, ...).

    Raises:
        ConfigError: an unknown setting or a bad value; on use, when neither a key
            nor a base URL is set.
    """

    api_type = "openai"
    capabilities = Capabilities(
        json_schema=True,
        json_grammar=False,
        grammar=False,
        tools=True,
        streaming=True,
        embeddings=True,
        images=True,
        audio=True,
        files=True,
    )
    api_key_secret = "OPENAI_API_KEY"
    preset_base_url: str | None = None

    def __init__(
        self, *, base_url: str | None = None, api_key: str | None = None, cache: Any = None, **settings: Any
    ) -> None:
        super().__init__(api_key=api_key, cache=cache, base_url=base_url, **settings)
        self._inherited: list[Any] = []
        self._fresh_sdks()
        reset_in_child(self._fresh_sdks)

    _transient = (*Client._transient, "_sdks", "_closers", "_sdk_lock", "_inherited", "_formats", "_last_sdk")

    def _revive(self) -> None:
        self._inherited = []
        self._fresh_sdks()
        reset_in_child(self._fresh_sdks)

    def _fresh_sdks(self) -> None:
        """No SDK clients yet (at start, and in a forked child: the parent's clients own sockets the
        parent keeps using; sharing one would cross replies). The inherited ones are kept referenced,
        never used or closed, so the child cannot disturb the parent's connections."""
        if getattr(self, "_sdks", None):
            self._inherited.append((self._sdks, self._closers))
        self._sdk_lock = threading.Lock()
        self._sdks: dict[tuple, Any] = {}
        self._closers: dict[tuple, Any] = {}  # per async SDK client: see sdk()
        self._formats = FormatFallback()  # which response_format each endpoint takes: see _chat()
        self._last_sdk: tuple[Config | None, Any] = (None, None)  # (settings, their sync SDK client): see sdk()

    def close(self) -> None:
        """Close the synchronous SDK clients' connection pools (an async one is closed when its event
        loop shuts down); the next request opens a new one."""
        with self._sdk_lock:
            sync = [k for k in self._sdks if k[0] is None]
            closing = [self._sdks.pop(k) for k in sync]
            self._last_sdk = (None, None)
        for sdk in closing:
            sdk.close()

    def base_url(self, cfg: Config) -> str | None:
        return cfg.base_url or cfg.secret("OPENAI_BASE_URL") or self.preset_base_url

    def _api_key(self, cfg: Config) -> str:
        key = cfg.secret("OPENAI_API_KEY")
        if key:
            return key
        if self.base_url(cfg):
            return "no-key"  # local OpenAI-compatible servers take any key
        raise ConfigError(
            "api_type 'openai' needs OPENAI_API_KEY (environment or .env), or BASE_URL / OPENAI_BASE_URL "
            "for an OpenAI-compatible server; or use api_type 'llamacpp' for the embedded model"
        )

    def endpoint(self, cfg: Config, model: str) -> dict:
        return {"api_type": self.api_type, "base_url": self.where(cfg)}

    def where(self, cfg: Config) -> str:
        """The server's address, for error messages."""
        return self.base_url(cfg) or "https://api.openai.com/v1"

    def _keys(self, cfg: Config) -> tuple[str, ...]:
        return tuple(filter(None, (cfg.secret(name) for name in API_KEY_NAMES)))  # endpoints stay readable

    def _error(self, exc: BaseException, cfg: Config, timeout: float | None = None) -> TinyLLMError:
        """The tinyllm error for an SDK failure; the SDK exception (to be chained) is scrubbed too.

        The transport already took the keys out of error replies (see ``transport``);
        here the sent requests the exception chain keeps lose their credential headers.
        """
        _scrub_chain(exc)
        return map_error(
            exc, secrets=self._keys(cfg), timeout=timeout or cfg.timeout, where=redact_url(self.where(cfg))
        )

    def _make_sdk(self, cfg: Config, is_async: bool) -> Any:
        import openai

        cls = openai.AsyncOpenAI if is_async else openai.OpenAI
        return cls(
            api_key=self._api_key(cfg),
            base_url=self.base_url(cfg),
            max_retries=0,
            timeout=cfg.timeout,
            http_client=http_client(is_async),
        )

    def _sdk_key(self, cfg: Config) -> tuple:
        return (self.base_url(cfg), self._api_key(cfg))

    def sdk(self, cfg: Config, is_async: bool = False) -> Any:
        """The SDK client for these settings (memoized per key and URL; the timeout goes with each request).

        An async SDK client is kept per event loop: its connection pool belongs to
        the loop that opened it, so a second ``asyncio.run`` must not reuse it. It
        is closed on its own loop when that loop shuts down its async generators
        (the end of ``asyncio.run``), and forgotten once the loop is closed.
        """
        if not is_async:
            last = self._last_sdk
            if last[0] is cfg:  # the same settings object as the last request: the same client
                return last[1]
        loop = asyncio.get_running_loop() if is_async else None
        key = (loop, *self._sdk_key(cfg))
        with self._sdk_lock:
            found = self._sdks.get(key)
            if found is None:
                if loop is not None:  # forget the clients of loops that are gone
                    for old in [k for k in self._sdks if k[0] is not None and k[0].is_closed()]:
                        del self._sdks[old]
                        self._closers.pop(old, None)
                found = self._sdks[key] = self._make_sdk(cfg, is_async)
                if loop is not None:
                    self._closers[key] = closer = _close_at_loop_shutdown(found)
                    loop.create_task(_first_step(closer))
            if loop is None:
                self._last_sdk = (cfg, found)
            return found

    def _request_args(self, messages: list[dict], params: dict, cfg: Config) -> dict:
        """Keyword arguments of the SDK's ``post("/chat/completions", ...)``.

        The parameters go into the JSON body as they are, ``extra_body`` merged in
        last; ``timeout`` (seconds), ``extra_headers`` and ``extra_query`` become
        request options. The SDK's ``chat.completions.create`` would first walk the
        body against its TypedDicts (``maybe_transform``) and build pydantic models
        from the reply: for the plain JSON values tinyllm sends and reads, both
        change nothing and cost about half of the SDK's CPU time per request
        (``bench/overhead.py``). ``post`` is the SDK's public way to send a body
        as-is; its retries (off), headers, auth and Azure deployment routing apply.
        """
        if isinstance(params.get("response_format"), type):  # what create() would refuse too
            raise BadRequestError(
                'response_format must be a dict such as {"type": "json_object"}; '
                "for a pydantic model use LLMCall(..., output_type=Model)"
            )
        body = {k: v for k, v in params.items() if k not in _NOT_SENT}
        body["messages"] = messages
        body.update(params.get("extra_body") or {})
        timeout = params.get("timeout")
        if timeout is not None and not timeout > 0:
            raise BadRequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        options: dict[str, Any] = {"timeout": cfg.timeout if timeout is None else timeout}
        if params.get("extra_headers"):
            options["headers"] = params["extra_headers"]
        if params.get("extra_query"):
            options["params"] = params["extra_query"]
        return {"cast_to": object, "body": body, "options": options}

    # -- structured-output fallback (tinyllm/clients/fallback.py) ----------------------
    def _format_endpoint(self, cfg: Config, params: dict) -> str:
        """The key under which the response_format this server takes is remembered: address and model."""
        return f"{redact_url(self.where(cfg))} (model {params.get('model')})"

    def _chat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        """One attempt; a json_schema request the server refuses (4xx/5xx) is sent again at once as
        json_object with the schema, then without response_format (never through the retry loop)."""
        if not structured(params):  # the usual request: nothing to fall back from
            return self._chat_once(messages, params, cfg)
        return self._formats.send(
            self._format_endpoint(cfg, params), messages, params, lambda m, p: self._chat_once(m, p, cfg)
        )

    async def _achat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        """The asyncio twin of :meth:`_chat`."""
        if not structured(params):
            return await self._achat_once(messages, params, cfg)
        return await self._formats.asend(
            self._format_endpoint(cfg, params), messages, params, lambda m, p: self._achat_once(m, p, cfg)
        )

    # -- end of the structured-output fallback --------------------------------------------

    def _chat_once(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        sdk = self.sdk(cfg)
        try:
            response = sdk.post("/chat/completions", **self._request_args(messages, params, cfg))
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._read(response, cfg)

    async def _achat_once(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        sdk = self.sdk(cfg, is_async=True)
        try:
            response = await sdk.post("/chat/completions", **self._request_args(messages, params, cfg))
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._read(response, cfg)

    # -- streaming: the SDK's server-sent events ----------------------------------------
    def _stream_args(self, messages: list[dict], params: dict, cfg: Config) -> dict:
        """``_request_args`` for a streamed request: ``stream: true`` and, unless given,
        ``stream_options: {"include_usage": true}`` so the server sends the usage at the end."""
        import openai

        args = self._request_args(messages, params, cfg)
        args["body"]["stream"] = True
        args["body"].setdefault("stream_options", {"include_usage": True})
        return {**args, "stream": True, "stream_cls": openai.Stream[object]}

    def _chat_stream(self, messages: list[dict], params: dict, cfg: Config) -> Iterator[dict]:
        """One streamed request: the chunk dicts of the server's events; closing it closes the response."""
        sdk = self.sdk(cfg)
        try:
            stream = sdk.post("/chat/completions", **self._stream_args(messages, params, cfg))
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        return self._chunks(stream, cfg, params)

    def _chunks(self, stream: Any, cfg: Config, params: dict) -> Iterator[dict]:
        try:
            for chunk in stream:
                yield chunk
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        finally:
            stream.close()

    def _achat_stream(self, messages: list[dict], params: dict, cfg: Config) -> AsyncIterator[dict]:
        """The asyncio twin of :meth:`_chat_stream` (the SDK's ``AsyncStream``)."""
        return self._achunks(messages, params, cfg)

    async def _achunks(self, messages: list[dict], params: dict, cfg: Config) -> AsyncIterator[dict]:
        import openai

        sdk = self.sdk(cfg, is_async=True)
        args = self._stream_args(messages, params, cfg)
        args["stream_cls"] = openai.AsyncStream[object]
        try:
            stream = await sdk.post("/chat/completions", **args)
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        try:
            async for chunk in stream:
                yield chunk
        except Exception as exc:
            raise self._error(exc, cfg, params.get("timeout")) from exc
        finally:
            await stream.close()

    def _read(self, response: Any, cfg: Config) -> tuple[dict, dict, dict]:
        """:func:`~tinyllm.clients._replies.extract_reply`, with API keys scrubbed from a ResponseError's message and ``raw``."""
        try:
            return extract_reply(response)
        except ResponseError as exc:
            keys = self._keys(cfg)
            raise ResponseError(redact(str(exc), keys), raw=redact_body(exc.raw, keys)) from None

    def _embed(self, texts: list[str], model: str, cfg: Config) -> tuple[list[list[float]], dict]:
        sdk = self.sdk(cfg)
        try:
            response = sdk.embeddings.create(input=texts, model=self.embedding_target(cfg, model), timeout=cfg.timeout)
            data = sorted(response.data, key=lambda d: d.index)
            return [list(d.embedding) for d in data], (response.usage.model_dump() if response.usage else {})
        except Exception as exc:
            raise self._error(exc, cfg) from exc

    def embedding_target(self, cfg: Config, model: str) -> str:
        """The ``model`` value sent for embeddings (Azure sends a deployment name)."""
        return model


class OllamaClient(OpenAIClient):
    """The openai client preset to Ollama's OpenAI-compatible API at http://localhost:11434/v1 (BASE_URL overrides)."""

    api_type = "ollama"
    preset_base_url = "http://localhost:11434/v1"
    # Ollama's OpenAI-compatible API: structured output (json_schema) since 0.5, tools, streaming, /v1/embeddings,
    # images (image_url parts, for vision models); no input_audio or file parts
    capabilities = Capabilities(
        json_schema=True,
        json_grammar=False,
        grammar=False,
        tools=True,
        streaming=True,
        embeddings=True,
        images=True,
        audio=False,
        files=False,
    )

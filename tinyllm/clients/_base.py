"""The send_message pipeline every client shares: one core, a sync and an async front end.

``send_message(messages, **params)``:

1. resolve parameters: config (``MODEL``, ``MAX_TOKENS``, ``TEMPERATURE``, ...) <
   the ``params`` given; unset ones (None) are dropped, never sent;
2. adapt them to the model family (``models.adapt_params``);
3. cache lookup (key: sha256 of the endpoint identity, model, messages, params);
4. on a miss, count prompt tokens and refuse early when prompt + ``max_tokens``
   cannot fit the context window (:class:`ContextWindowExceededError`, nothing sent);
5. take a request-queue slot and pass the rate limits;
6. the client's retry loop (``retry.Retrying``) around one raw API request (``_chat``);
   with cluster-wide limits (REDIS_URL) step 5 is done per attempt instead (``queue.lease``);
7. record usage, store the reply in the cache, return the message dict.

A client is an object with its own settings: ``OpenAIClient(base_url=..., api_key=...,
timeout=..., max_attempts=..., cache=..., max_concurrent_requests=...)``. A setting
not given comes from the layered configuration (:func:`tinyllm.get_config`) at
call time. Each client owns its request queue, its retry loop and its cache
choice, and declares what it can do in :attr:`Client.capabilities`.

Subclasses implement the raw request (``_chat`` / ``_achat`` / ``_embed``) and
the endpoint identity; nothing else.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import time
import weakref
from dataclasses import dataclass, field
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable

from ..cache import _store as cache_mod
from .. import models, tokens
from . import _retry as retry
from ..observe import _usage as usage
from ..limits import _budget as budget  # cost, budgets, spans (tinyllm/budget.py, otel.py, pricing.py)
from ..observe import _otel as otel
from ..observe import _pricing as pricing
from ..config import Config, get_config, redact_url
from ..errors import (
    APIConnectionError,
    BadRequestError,
    CacheValueError,
    ConfigError,
    MediaError,
    ResponseError,
    TinyLLMError,
)
from ..limits._queue import RequestQueue
from .._streaming import Accumulator

__all__ = [
    "Client",
    "Capabilities",
    "Reply",
    "ReplyStream",
    "AsyncReplyStream",
    "CallInfo",
    "last_call_info",
    "PlainClient",
]

# API parameters whose default is the setting of the same name; a parameter left unset is not sent.
CONFIG_PARAMS = ("max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty")
log = logging.getLogger("tinyllm")
_ROLES = frozenset({"system", "user", "assistant", "developer", "tool", "function"})
_PLAIN = frozenset({str, int, float, bool, dict, list})  # parameter types that are never iterators
#: token counts above this are refused as impossible when the model's context window is unknown
#: (10 million: the largest context windows announced, Llama 4 Scout's, are that size)
MAX_PLAUSIBLE_TOKENS = 10_000_000


@dataclass(frozen=True)
class Capabilities:
    """What a client can do; the call layer asks this declaration instead of testing types.

    The defaults claim nothing: ``Capabilities()`` is a client that takes plain chat
    messages and nothing more (a typed output is asked for in the prompt, or as
    ``response_format={"type": "json_object"}`` for ``dict`` and models, and checked
    after; tools are refused with a ConfigError; ``LLMCall.stream()`` answers in one
    piece). Each built-in client sets every field it supports explicitly.

    Attributes:
        json_schema: takes ``response_format={"type": "json_schema", ...}`` (OpenAI's structured output).
        json_grammar: enforces a JSON schema by a grammar while generating (llama.cpp), so
            every JSON-shaped output type (``list`` too) gets a schema.
        grammar: takes a GBNF grammar as a string parameter ``grammar`` (llama.cpp), so
            labels, integers, floats and booleans are constrained while generating too.
        tools: takes ``tools`` / ``tool_choice``.
        streaming: can stream a reply (``stream=True``).
        embeddings: has an embeddings endpoint.
        images: takes ``image_url`` content parts (:class:`tinyllm.Image`).
        audio: takes ``input_audio`` content parts (:class:`tinyllm.Audio`).
        files: takes ``file`` content parts (:class:`tinyllm.File`, PDF).

    A request holding content the client does not take is refused before anything is sent
    (:class:`~tinyllm.MediaError` naming the client and what it lacks). Whether a given *model*
    behind an OpenAI-compatible server sees images is the server's business: it answers 400 if not.
    """

    json_schema: bool = False
    json_grammar: bool = False
    grammar: bool = False
    tools: bool = False
    streaming: bool = False
    embeddings: bool = False
    images: bool = False
    audio: bool = False
    files: bool = False


@dataclass
class CallInfo:
    """What the last ``send_message`` in this thread or task did.

    Attributes: model (str), usage (dict, the API's ``usage``), cached (bool),
    latency (float, seconds from call to return), prompt_tokens (int, counted locally).
    """

    model: str
    usage: dict = field(default_factory=dict)
    cached: bool = False
    latency: float = 0.0
    prompt_tokens: int = 0


# (the model asked for, the Reply) of the last request in this thread or task; CallInfo is built when asked for
_last_call: contextvars.ContextVar[tuple[str, "Reply"] | None] = contextvars.ContextVar(
    "tinyllm_last_call", default=None
)


def last_call_info() -> CallInfo | None:
    """The :class:`CallInfo` of the last send_message in this thread or asyncio task.

    Returns None before the first call in this thread or task (a lookup, not a failure).
    """
    last = _last_call.get()
    if last is None:
        return None
    model, reply = last
    return CallInfo(model, reply.usage, reply.cached, reply.latency, reply.prompt_tokens)


@dataclass(slots=True)
class _Request:
    cfg: Config
    messages: list[dict]
    params: dict
    model: str
    prompt_tokens: int
    rate_tokens: int  # prompt + max_tokens: what counts against TOKENS_PER_MINUTE
    key: str | None
    cache: Any
    started: float
    accept: Callable[[dict], bool] | None = None
    retries: int = 0


@dataclass
class Reply:
    """What one trip through a client's pipeline produced (one reply, from the API or the cache).

    Attributes:
        message: the reply's message dict (``role``, ``content``; ``tool_calls``, ``refusal`` when sent).
        usage: the API's ``usage`` dict (``prompt_tokens``, ``completion_tokens``, ``total_tokens``).
        model: the model that answered (the server's ``model`` field), else the one asked for.
        finish_reason: ``stop``, ``length``, ``tool_calls``, ... or None when not reported.
        cached: answered from the cache.
        latency: seconds from the call to the reply, queue and retries included.
        retries: extra HTTP attempts this reply took.
        prompt_tokens: the prompt's tokens as counted locally (0 for a cache hit not counted).
        api_type: the client's api_type.
        cost: USD (:mod:`tinyllm.observe._pricing`; 0.0 from the cache), None when the price is unknown.
        client: the :class:`Client` that answered.
        attempts: with fallbacks, the failed tries of other clients before this reply
            (``list[tinyllm.clients._chain.Attempt]``); else empty.
        logprobs: the first choice's tokens with their log probabilities (``logprobs.content``:
            ``[{"token", "logprob", "bytes", "top_logprobs"}, ...]``) when asked for, else None.
        choices: every choice, ``[{"index", "message", "finish_reason", "logprobs"}, ...]``, when
            the reply has several (``n``); None for one (then ``message`` is the only one).
    """

    message: dict
    usage: dict
    model: str
    finish_reason: str | None = None
    cached: bool = False
    latency: float = 0.0
    retries: int = 0
    prompt_tokens: int = 0
    api_type: str = ""
    cost: float | None = None
    client: Any = field(default=None, repr=False)
    attempts: list = field(default_factory=list, repr=False)
    logprobs: list | None = None
    choices: list | None = None


def _list_of_dicts(value: Any) -> list | None:
    """``value`` when it is a list of dicts (a stored reply's ``logprobs``), else None."""
    return value if isinstance(value, list) and all(isinstance(v, dict) for v in value) else None


def _stored_choices(value: Any) -> list | None:
    """A stored reply's ``choices`` when each is ``{"index": int, "message": dict, ...}``, else None (choice 0 only)."""
    if not isinstance(value, list) or not all(
        isinstance(c, dict) and isinstance(c.get("index"), int) and isinstance(c.get("message"), dict) for c in value
    ):
        return None
    return value


async def _to_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread``, with asyncio imported on first use (``import tinyllm`` does not import it)."""
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)


def validate_messages(messages: Any) -> list[dict]:
    """Check the shape of chat ``messages``; return them as a list.

    Raises:
        BadRequestError: not a non-empty list of dicts with a known ``role``
            and a ``content`` (None only for assistant turns).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise BadRequestError(f"messages[{i}] must be a dict with a role in {sorted(_ROLES)}, got {m!r:.200}")
        if m.get("content") is None and m["role"] != "assistant":
            raise BadRequestError(f"messages[{i}] ({m['role']}) has no content")
    return list(messages)


def _refuse_unsendable(params: dict) -> None:
    """Refuse, before anything is sent or cached, parameters tinyllm cannot honour as request parameters.

    Raises:
        BadRequestError: ``api_key`` (a client setting: it would travel in the JSON
            body and show in reprs), or ``stream=True`` (a streamed reply is read by
            :meth:`Client.stream_request` / ``LLMCall.stream``, not by ``send_message``),
            given directly or in ``extra_body``.
    """
    if "api_key" not in params and "stream" not in params and "extra_body" not in params:
        return  # the usual case
    extra = params.get("extra_body")
    for source in (params, extra if isinstance(extra, dict) else {}):
        if source.get("api_key") is not None:
            raise BadRequestError(
                "api_key is a client setting, not a request parameter, and was not sent: pass it to the client "
                "(OpenAIClient(api_key=...)) or set OPENAI_API_KEY (or AZURE_OPENAI_KEY) in the environment or .env"
            )
        if source.get("stream"):
            raise BadRequestError(
                "stream=True is not a request parameter: use LLMCall.stream() / "
                "client.stream_request() to stream (nothing was sent)"
            )


class Client:
    """Base of every client: the shared send_message / get_embedding pipeline.

    Args:
        api_key: the API key (str) for subclasses that take one (:attr:`api_key_secret`
            names the environment variable it replaces); kept out of every repr,
            log and error, never sent in a request body.
        cache: None: as the settings say (``CACHE_API_CALLS``, ``CACHE_FILE_NAME``,
            or :func:`tinyllm.force_api_cache`); False: no cache; True: the
            settings' cache file; a path: a :class:`~tinyllm.cache.PickleCache`
            there; or any cache object (``get``/``set``, e.g. ``MemoryCache()``).
        **settings: any setting by its lower-case config key (``model``,
            ``timeout`` in seconds, ``max_attempts``, ``base_url``,
            ``max_concurrent_requests``, ``requests_per_minute``, ...); None
            means "not given": the layered configuration's value applies.

    Raises:
        ConfigError: an unknown setting or a value that does not parse; an
            ``api_key`` for a client that takes none, or not a non-empty str.

    Subclasses set ``api_type`` and :attr:`capabilities` and implement
    :meth:`endpoint`, :meth:`_chat` (one request, returning
    ``(message_dict, usage_dict)`` or ``(message_dict, usage_dict, info)`` with
    ``info = {"model": ..., "finish_reason": ...}``, and raising tinyllm errors) and
    :meth:`_embed`; they may override :meth:`_achat`, :meth:`count_tokens` and
    :meth:`context_window`.
    """

    api_type = "base"
    capabilities = Capabilities()
    #: the secret (environment variable name) an ``api_key=`` argument stands for; None: takes no key
    api_key_secret: str | None = None

    def __init__(self, *, api_key: str | None = None, cache: Any = None, **settings: Any) -> None:
        settings = {k: v for k, v in settings.items() if v is not None}
        Config().replace(settings)  # ConfigError now for an unknown name or a bad value
        if api_key is not None and (not self.api_key_secret or not isinstance(api_key, str) or not api_key):
            raise ConfigError(
                f"{type(self).__name__} takes no api_key"
                if not self.api_key_secret
                else "api_key must be a non-empty str"
            )
        self._settings = settings
        self._secrets = {self.api_key_secret: api_key} if api_key else {}
        self._cache = cache
        self._memo: tuple[Config, Config] | None = None  # (configuration snapshot, these settings over it)
        self._retrying: tuple[Config, retry.Retrying] | None = None  # (the settings it was built for, the loop)
        self.queue = RequestQueue(self.api_type)

    def __repr__(self) -> str:
        shown = {k: redact_url(v) if isinstance(v, str) and "://" in v else v for k, v in self._settings.items()}
        return f"<{type(self).__name__} api_type={self.api_type!r} settings={shown!r}>"

    # -- pickling (to Dask workers, other processes): settings yes, API keys and live objects no --
    #: attributes rebuilt on unpickling, never pickled (subclasses add their SDK objects)
    _transient: tuple[str, ...] = ("queue", "_memo", "_retrying")
    #: the secret an ``api_key=`` stood for before this client was pickled (see __getstate__)
    _key_withheld: str | None = None

    def __getstate__(self) -> dict:
        """The client's settings, without its API key, request queue, retry loop or SDK objects.

        An API key given as ``api_key=`` is never pickled: the unpickled client reads the key
        from its own process's settings (``OPENAI_API_KEY`` / ``AZURE_OPENAI_KEY`` in the
        environment or .env) and, when there is none, refuses each request with a ConfigError
        naming the variable to set (it never falls back to sending no key). Other secrets
        given in code (an Azure ``endpoint=``) are carried. The unpickled client gets a
        request queue of its own (with REDIS_URL the limits are cluster-wide anyway).

        Raises:
            ConfigError: ``cache=`` is a cache object (objects hold files, locks or
                connections): give ``cache=True`` / a path, or share a cache with REDIS_URL.
        """
        if not (self._cache is None or isinstance(self._cache, (bool, str, os.PathLike))):
            raise ConfigError(
                f"a {type(self).__name__} with a cache object ({type(self._cache).__name__}) cannot be sent "
                "to another process; give cache=True or a file path, or set REDIS_URL to share a cache"
            )
        from ..config import API_KEY_NAMES

        keys = {self.api_key_secret, *API_KEY_NAMES}
        state = {k: v for k, v in self.__dict__.items() if k not in self._transient}
        state["_secrets"] = {k: v for k, v in self._secrets.items() if k not in keys}
        withheld = [k for k in self._secrets if k in keys]
        state["_key_withheld"] = withheld[0] if withheld else self._key_withheld
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._memo = None
        self._retrying = None
        self.queue = RequestQueue(self.api_type)
        self._revive()

    def _revive(self) -> None:
        """Rebuild what :attr:`_transient` left out (subclasses with SDK objects override it)."""

    def close(self) -> None:
        """Close the connections this client keeps open (its HTTP connection pools); the client stays
        usable and opens new ones on its next request. The base class holds none."""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def settings(self) -> Config:
        """This client's settings now: the layered configuration with the client's own on top.

        Recomputed only when the configuration snapshot changes (a few µs otherwise).
        """
        base = get_config()
        memo = self._memo
        if memo is not None and memo[0] is base:
            return memo[1]
        merged = base.replace(self._settings)
        if self._secrets:
            merged = dataclasses.replace(merged, secrets={**merged.secrets, **self._secrets})
        if self._key_withheld is not None and not merged.secret(self._key_withheld):
            raise ConfigError(
                f"this {type(self).__name__} was given api_key= in the process that pickled it; API keys "
                f"are never pickled: set {self._key_withheld} in this process's environment (or .env)"
            )
        self._memo = (base, merged)
        return merged

    def retrying(self, cfg: Config) -> retry.Retrying:
        """The retry loop for these settings (built once, again only when the policy changes)."""
        memo = self._retrying
        if memo is not None and memo[0] is cfg:  # the same settings object: the same loop
            return memo[1]
        policy = retry.RetryPolicy.from_config(cfg)
        loop = memo[1] if memo is not None and memo[1].policy == policy else retry.Retrying(policy)
        self._retrying = (cfg, loop)
        return loop

    def cache(self, cfg: Config) -> Any:
        """The cache this client uses with settings ``cfg``, or None (see the ``cache`` argument).

        Raises:
            ConfigError: the cache file cannot be opened.
        """
        chosen = self._cache
        if chosen is None:
            return _open_cache(cfg)
        if chosen is False:
            return None
        if chosen is True or isinstance(chosen, (str, os.PathLike)):
            name = cfg.cache_file_name if chosen is True else os.fspath(chosen)
            backend = cfg.cache_backend if chosen is True else "pickle"  # a path is a pickle file
            return _open_cache(
                dataclasses.replace(cfg, cache_api_calls=True, cache_file_name=name, cache_backend=backend),
                forced=False,
            )
        return chosen

    # -- what subclasses provide -------------------------------------------------
    def endpoint(self, cfg: Config, model: str) -> dict:
        """The identity of the server and deployment, for the cache key (never the key)."""
        raise NotImplementedError

    def default_model(self, cfg: Config) -> str:
        """The model used when neither params nor config name one."""
        return cfg.model

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        """Prompt tokens of ``messages`` for ``model`` (tiktoken and the OpenAI cookbook rule).

        ``cfg``: the request's settings (default: :meth:`settings`), for clients whose
        tokenizer depends on them.
        """
        return tokens.count_tokens(messages, model)

    def context_window(self, model: str, cfg: Config | None = None) -> int | None:
        """The model's context window in tokens, or None when unknown."""
        info = models.model_info(model)
        return info.context_window if info else None

    def _chat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        raise NotImplementedError

    async def _achat(self, messages: list[dict], params: dict, cfg: Config) -> tuple[dict, ...]:
        return await _to_thread(self._chat, messages, params, cfg)

    def _embed(self, texts: list[str], model: str, cfg: Config) -> tuple[list[list[float]], dict]:
        raise NotImplementedError

    def default_embedding_model(self, cfg: Config) -> str:
        return cfg.embedding_model

    def limit_scope(self, cfg: Config, endpoint: dict) -> str:
        """Who shares cluster-wide limits (REDIS_URL): a hash of ``endpoint`` and of the API key, never the key."""
        from ..limits._redis import scope_id

        api_key = getattr(self, "_api_key", None)
        return scope_id(endpoint, api_key(cfg) if api_key is not None else None)

    def embedding_endpoint(self, cfg: Config, model: str) -> dict:
        """The endpoint identity of embedding requests, for the cache key (default: :meth:`endpoint`)."""
        return self.endpoint(cfg, model)

    # -- the shared core ---------------------------------------------------------
    def resolve_params(self, params: dict, cfg: Config) -> dict:
        """Config defaults < ``params``; drop None; iterators to lists; adapt to the model family. Returns a new dict.

        Raises:
            BadRequestError: ``model`` is not a non-empty str; ``api_key`` or
                ``stream=True`` given as a parameter (see :func:`_refuse_unsendable`).
        """
        out: dict[str, Any] = {"model": self.default_model(cfg)}
        for name in CONFIG_PARAMS:
            out[name] = getattr(cfg, name)
        out.update(params)
        # a generator (e.g. tools=(t for t in ...)) is read once, here: the cache key and the request see a list
        out = {
            k: v if type(v) in _PLAIN or not isinstance(v, Iterator) else list(v)
            for k, v in out.items()
            if v is not None
        }
        _refuse_unsendable(out)
        out.setdefault("model", self.default_model(cfg))  # model=None means the default, not "no model"
        if not isinstance(out["model"], str) or not out["model"]:
            raise BadRequestError(f"model must be a non-empty str, got {out['model']!r}")
        return models.adapt_params(out["model"], out, reasoning_effort=cfg.reasoning_effort)

    def check_media(self, messages: list[dict]) -> None:
        """Refuse content parts (images, audio, files) :attr:`capabilities` says this client does not take.

        Raises:
            MediaError: naming the client and what it lacks; nothing is sent.
        """
        if not any(isinstance(m.get("content"), list) for m in messages):
            return
        from ..media import kinds_in

        missing = sorted(k for k in kinds_in(messages) if not getattr(self.capabilities, k, True))
        if missing:
            raise MediaError(
                f"the {self.api_type!r} client takes no {' or '.join(missing)}: {self.media_refusal(missing)}"
            )

    def media_refusal(self, missing: list[str]) -> str:
        """Why this client takes none of ``missing`` and what to do instead (for :meth:`check_media`'s error)."""
        return "its capabilities say so; send them through a client whose model takes them"

    def _prepare(self, messages: Any, params: dict, accept: Callable[[dict], bool] | None) -> _Request:
        started = time.perf_counter()
        cfg = self.settings()
        messages = validate_messages(messages)
        self.check_media(messages)
        params = self.resolve_params(params, cfg)
        model = params["model"]
        cache = self.cache(cfg)
        key = cache_mod.cache_key(self.endpoint(cfg, model), model, messages, params) if cache is not None else None
        return _Request(cfg, messages, params, model, 0, 0, key, cache, started, accept)

    def _measure(self, req: _Request) -> None:
        """Count the prompt (after the cache missed: counting may load a local model) and refuse it
        early when prompt + max_tokens cannot fit the context window."""
        req.prompt_tokens = self.count_tokens(req.messages, req.model, req.cfg)
        max_tokens = req.params.get("max_tokens", req.params.get("max_completion_tokens"))
        window = self.context_window(req.model, req.cfg)
        tokens.check_context_window(req.prompt_tokens, max_tokens, req.model, context_window=window)
        req.rate_tokens = req.prompt_tokens + (max_tokens or 0)

    def _lookup(self, req: _Request) -> Reply | None:
        if req.cache is None:
            return None
        hit = req.cache.get(req.key)
        if hit is None:
            return None
        problem = _cached_reply_problem(hit)
        if problem is not None:  # written by something else, or damaged: asked for again, and overwritten
            log.warning("cache entry %s is not a stored reply (%s); treated as a miss", req.key, problem)
            return None
        if req.accept is not None and not req.accept(hit["message"]):
            return None
        usage.record(calls=1, cached_calls=1)
        hit_usage = dict(hit.get("usage") or {})
        cost = pricing.reply_cost(self, req.cfg, hit_usage, hit.get("model"), req.model, cached=True)  # cost
        return self._reply(
            req,
            hit["message"],
            hit_usage,
            {
                "model": hit.get("model"),
                "finish_reason": hit.get("finish_reason"),
                "logprobs": _list_of_dicts(hit.get("logprobs")),
                "choices": _stored_choices(hit.get("choices")),
            },
            cached=True,
            prompt_tokens=int(hit_usage.get("prompt_tokens") or 0),
            cost=cost,
        )  # the cache hands out copies

    def _finish(self, req: _Request, result: tuple) -> Reply:
        message, reply_usage = result[0], result[1]
        info = result[2] if len(result) > 2 else {}
        if not isinstance(message, dict) or "role" not in message:
            raise ResponseError("the client returned no message dict", raw=message)
        self._check_usage(req, reply_usage)
        cost = budget.charge(self, req.cfg, reply_usage, info.get("model"), req.model)  # cost: priced, spent
        usage.record_reply(reply_usage, cost, req.model)  # counted (the process budget's spending; the longest reply)
        if req.cache is not None and req.key is not None and (req.accept is None or req.accept(message)):
            _store(
                req.cache,
                req.key,
                {"message": message, "usage": reply_usage, **{k: v for k, v in info.items() if v is not None}},
            )
        return self._reply(
            req, message, dict(reply_usage), info, cached=False, prompt_tokens=req.prompt_tokens, cost=cost
        )

    def _check_usage(self, req: _Request, reply_usage: Any) -> None:
        """Refuse token counts no reply can have before they are counted or charged: negative, a prompt or
        a completion above twice the model's context window (when it is unknown: :data:`MAX_PLAUSIBLE_TOKENS`),
        a total above twice that.

        Raises:
            ResponseError: naming the field and the bound (``raw``: the usage dict).
        """
        if not isinstance(reply_usage, dict):
            raise ResponseError(f"the reply's usage is {type(reply_usage).__name__}, not an object", raw=reply_usage)
        try:
            window = self.context_window(req.model, req.cfg)
        except Exception:  # noqa: BLE001 - unknown window: the plausibility bound alone
            window = None
        # A prompt or a completion fits the window. Tokenizers differ (a server's count of an OpenAI-compatible
        # model, the window tinyllm knows for a name) and windows may or may not count the output, so twice the
        # window is allowed for each, four times for the total: only the absurd (10^15 tokens) is refused.
        bound = 2 * window if window else MAX_PLAUSIBLE_TOKENS
        for name, most in (("prompt_tokens", bound), ("completion_tokens", bound), ("total_tokens", 2 * bound)):
            value = reply_usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= most:
                what = (
                    f"{most // window} times the context window of {req.model} ({window} tokens)"
                    if window
                    else f"{most} tokens"
                )
                raise ResponseError(
                    f"the server reported {name}={value}, which no reply can have (more than {what}, "
                    "or below 0); the usage was not counted or charged",
                    raw=reply_usage,
                )

    def _reply(
        self,
        req: _Request,
        message: dict,
        reply_usage: dict,
        info: dict,
        *,
        cached: bool,
        prompt_tokens: int,
        cost: float | None = None,
    ) -> Reply:
        reply = Reply(
            message,
            reply_usage,
            info.get("model") or req.model,
            info.get("finish_reason"),
            cached,
            time.perf_counter() - req.started,
            req.retries,
            prompt_tokens,
            self.api_type,
            cost,
            self,
            logprobs=info.get("logprobs"),
            choices=info.get("choices"),
        )
        _last_call.set((req.model, reply))
        return reply

    def send_message(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> dict:
        """Send chat ``messages`` and return the reply's message dict (``request(...).message``).

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|..., "content": str}, ...]``.
            accept: with the cache on, a reply for which ``accept(message)`` is
                False is returned but not stored, and such a stored reply is not
                served (LLMCall passes "fits output_type", so a reply that failed
                to parse is asked for again on a rerun).
            **params: API parameters (``model``, ``temperature``, ``max_tokens``,
                ``timeout`` in seconds, ...); they override the configured
                defaults; None means "not set".

        Returns:
            dict with at least ``role`` and ``content`` (``tool_calls`` and
            ``refusal`` kept when the server sends them).

        Raises:
            BadRequestError: malformed messages; ``api_key`` or ``stream=True`` given as a parameter
                (nothing is sent); or a 4xx the server sent.
            ContextWindowExceededError: the prompt cannot fit (nothing was sent).
            QueueFullError: no request slot within QUEUE_TIMEOUT.
            RateLimitError: (also ServerError, APIConnectionError, APITimeoutError,
                ResponseError) after the retries the policy allows.
        """
        return self.request(messages, accept=accept, **params).message

    async def asend_message(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> dict:
        """The asyncio twin of :meth:`send_message`: same cache, queue, retries and errors."""
        return (await self.arequest(messages, accept=accept, **params)).message

    def request(self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any) -> Reply:
        """Send chat ``messages`` through the pipeline and return the whole :class:`Reply`.

        Arguments and errors as :meth:`send_message`.
        """
        req = self._prepare(messages, params, accept)
        hit = self._lookup(req)
        if hit is not None:
            return hit
        self._measure(req)
        cfg = req.cfg
        if self.queue.cluster_wide(cfg) or otel.enabled():
            scope = self._scope(req)

            def attempt(n: int) -> tuple:
                with self.queue.lease(cfg, req.rate_tokens, scope):  # cluster-wide limits: one slot per HTTP attempt
                    return otel.attempt(req.model, n, self._chat, req.messages, self._attempt_params(req, n), cfg)
        else:  # the same, without the parts that would do nothing

            def attempt(n: int) -> tuple:
                return self._chat(req.messages, self._attempt_params(req, n), cfg)

        with budget.hold(self, req):  # budget: refused before sending when MAX_COST could be exceeded
            with self.queue.slot(cfg, req.rate_tokens):
                result = self.retrying(cfg).call(attempt)
            return self._finish(req, result)

    async def arequest(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> Reply:
        """The asyncio twin of :meth:`request`."""
        req = self._prepare(messages, params, accept)
        hit = self._lookup(req)
        if hit is not None:
            return hit
        self._measure(req)
        cfg = req.cfg
        if self.queue.cluster_wide(cfg) or otel.enabled():
            scope = self._scope(req)

            async def attempt(n: int) -> tuple:
                async with self.queue.alease(
                    cfg, req.rate_tokens, scope
                ):  # cluster-wide limits: one slot per HTTP attempt
                    with otel.attempt_span(req.model, n):  # otel: one span per HTTP attempt
                        return await self._achat(req.messages, self._attempt_params(req, n), cfg)
        else:  # the same, without the parts that would do nothing

            async def attempt(n: int) -> tuple:
                return await self._achat(req.messages, self._attempt_params(req, n), cfg)

        async with budget.ahold(self, req):  # budget: refused before sending when MAX_COST could be exceeded
            async with self.queue.aslot(cfg, req.rate_tokens):
                result = await self.retrying(cfg).acall(attempt)
            return self._finish(req, result)

    def _scope(self, req: _Request) -> Callable[[], str]:
        """Who shares the cluster-wide limits of ``req``, computed only when Redis limits are on."""
        return lambda: self.limit_scope(req.cfg, self.endpoint(req.cfg, req.model))

    def _attempt_params(self, req: _Request, attempt: int) -> dict:
        """The parameters of attempt number ``attempt`` (0 first): a copy, with the retry
        count the SDK would send (``x-stainless-retry-count``) from the second attempt on."""
        req.retries = attempt
        params = dict(req.params)
        if attempt:
            params["extra_headers"] = {**(params.get("extra_headers") or {}), "x-stainless-retry-count": str(attempt)}
        return params

    # -- streaming -----------------------------------------------------------------
    def _chat_stream(self, messages: list[dict], params: dict, cfg: Config) -> Iterator[dict]:
        """One streamed request: an iterator of chunk dicts (see :mod:`tinyllm._streaming`) that
        raises tinyllm errors and releases its connection when closed. Clients whose
        ``capabilities.streaming`` is True implement it."""
        raise BadRequestError(f"the {self.api_type!r} client cannot stream")

    def _achat_stream(self, messages: list[dict], params: dict, cfg: Config) -> AsyncIterator[dict]:
        """The asyncio twin of :meth:`_chat_stream`; by default the sync stream, read in a worker thread."""
        return _in_thread(lambda: self._chat_stream(messages, params, cfg))

    def stream_request(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> "ReplyStream":
        """Send chat ``messages`` as a streamed request: iterate the result for text deltas (str);
        its ``reply`` is the complete :class:`Reply` once the iteration ends.

        The cache is looked up first (a hit streams the stored text at once, ``cached``);
        the request-queue slot is held until the stream ends or is closed; retries apply
        until the first chunk arrives. A failure after that raises the usual typed error
        with ``.partial`` set to the text received so far. Only a complete stream is
        stored in the cache. Errors before sending as :meth:`send_message`.
        """
        req = self._prepare(messages, _without_stream(params), accept)
        return ReplyStream(self, req, self._lookup(req))

    def astream_request(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> "AsyncReplyStream":
        """The asyncio twin of :meth:`stream_request` (``async for delta in ...``)."""
        req = self._prepare(messages, _without_stream(params), accept)
        return AsyncReplyStream(self, req, self._lookup(req))

    def _finish_stream(self, req: _Request, acc: Accumulator) -> Reply:
        """The Reply of a complete stream; usage counted locally (and marked) when the server sent none."""
        message = acc.message()
        reply_usage = acc.usage
        if req.params.get("max_tokens", req.params.get("max_completion_tokens")) is None:
            # TPM reserved only the prompt: count the completion now that it is known
            completion = (reply_usage or {}).get("completion_tokens")
            self.queue.count_tokens(
                req.cfg,
                completion
                if isinstance(completion, int)
                else (tokens.count_tokens(acc.text, req.model) if acc.text else 0),
            )
        if reply_usage is None:
            completion = tokens.count_tokens(acc.text, req.model) if acc.text else 0
            reply_usage = {
                "prompt_tokens": req.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": req.prompt_tokens + completion,
                "counted_locally": True,
            }
        return self._finish(
            req,
            (
                message,
                reply_usage,
                {
                    "model": acc.model,
                    "finish_reason": acc.finish_reason,
                    "logprobs": acc.logprobs,
                    "choices": acc.choices(),
                },
            ),
        )

    # -- embeddings ----------------------------------------------------------------
    def get_embeddings(self, texts: list[str], model: str | None = None) -> list[list[float]]:
        """Embed ``texts`` (batched, one request for all cache misses), in input order.

        Returns:
            list[list[float]], one vector per text.

        Raises:
            BadRequestError: ``texts`` is not a list of strings; the errors of send_message otherwise.
        """
        if isinstance(texts, str):
            raise BadRequestError("texts must be a list of strings; use get_embedding() for one text")
        try:
            texts = list(texts)  # a generator is read once, here
        except TypeError:
            raise BadRequestError(f"texts must be a list of strings, got {type(texts).__name__}") from None
        if not all(isinstance(t, str) for t in texts):
            raise BadRequestError("texts must be a list of strings")
        if not texts:
            return []
        cfg = self.settings()
        model = model or self.default_embedding_model(cfg)
        cache = self.cache(cfg)
        endpoint = self.embedding_endpoint(cfg, model)
        keys = (
            [cache_mod.cache_key(endpoint, model, [{"embedding": t}], {}) for t in texts] if cache is not None else []
        )
        get_many = getattr(cache, "get_many", None)  # RedisCache: one round trip for all
        out: list[list[float] | None] = (
            (get_many(keys) if get_many is not None else [cache.get(k) for k in keys])
            if cache is not None
            else [None] * len(texts)
        )
        for i, v in enumerate(out):
            if v is not None and (problem := _cached_vector_problem(v)) is not None:
                log.warning("cache entry %s is not a stored embedding (%s); treated as a miss", keys[i], problem)
                out[i] = None
        missing = [i for i, v in enumerate(out) if v is None]
        if cache is not None:
            usage.record(calls=len(texts) - len(missing), cached_calls=len(texts) - len(missing))
        if missing:
            batch = [texts[i] for i in missing]
            rate_tokens = sum(tokens.count_tokens(t, model) for t in batch) if cfg.tokens_per_minute else 0
            scope = lambda: self.limit_scope(cfg, endpoint)  # noqa: E731

            def attempt(n: int) -> tuple[list[list[float]], dict]:
                with self.queue.lease(cfg, rate_tokens, scope):  # cluster-wide limits: one slot per HTTP attempt
                    return self._embed(batch, model, cfg)

            with self.queue.slot(cfg, rate_tokens):
                vectors, reply_usage = self.retrying(cfg).call(attempt)
            if len(vectors) != len(batch):
                raise ResponseError(f"asked for {len(batch)} embeddings, got {len(vectors)}", raw=None)
            usage.record(
                calls=1,
                prompt_tokens=int(reply_usage.get("prompt_tokens") or 0),
                total_tokens=int(reply_usage.get("total_tokens") or 0),
            )
            for i, vector in zip(missing, vectors):
                out[i] = vector
                if cache is not None:
                    _store(cache, keys[i], vector)
        return out  # type: ignore[return-value]

    def get_embedding(self, text: str, model: str | None = None) -> list[float]:
        """Embed one ``text``; returns ``list[float]``. Errors as :meth:`get_embeddings`."""
        return self.get_embeddings([text], model)[0]


def _open_cache(cfg: Config, forced: bool = True) -> Any:
    """The active cache for ``cfg`` (``forced``: :func:`force_api_cache` applies), with a
    file that cannot be opened reported as a ConfigError."""
    try:
        return cache_mod.active_cache(cfg, forced=forced)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the cache file: {exc}; fix CACHE_FILE_NAME or set CACHE_API_CALLS=false"
        ) from exc


def _cached_reply_problem(hit: Any) -> str | None:
    """What is wrong with a cache entry read for a chat reply, or None when it has the shape
    ``_finish`` stores: ``{"message": {"role": str, "content": str | None, "tool_calls"?: [...],
    "refusal"?: str}, "usage"?: {str: int | dict}, "model"?: str, "finish_reason"?: str}``."""
    if not isinstance(hit, dict):
        return f"a {type(hit).__name__}, not an object"
    message = hit.get("message")
    if not isinstance(message, dict):
        return f"its message is {type(message).__name__}, not an object"
    if not isinstance(message.get("role"), str):
        return "its message has no role"
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return f"its content is {type(content).__name__}, not text"
    if message.get("refusal") is not None and not isinstance(message["refusal"], str):
        return "its refusal is not text"
    calls = message.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list)
        and all(
            isinstance(c, dict)
            and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str)
            for c in calls
        )
    ):
        return "its tool_calls are malformed"
    usage_ = hit.get("usage")
    if usage_ is not None:
        if not isinstance(usage_, dict):
            return f"its usage is {type(usage_).__name__}, not an object"
        for name, value in usage_.items():
            if name.endswith("_tokens") and value is not None and not (type(value) is int and value >= 0):
                return f"its usage.{name} is not a token count"
            if (
                name.endswith("_details")
                and value is not None
                and not (
                    isinstance(value, dict) and all(v is None or type(v) is int and v >= 0 for v in value.values())
                )
            ):
                return f"its usage.{name} is not an object of token counts"
    for name in ("model", "finish_reason"):
        if hit.get(name) is not None and not isinstance(hit[name], str):
            return f"its {name} is not text"
    return None


def _cached_vector_problem(hit: Any) -> str | None:
    """What is wrong with a cache entry read for an embedding (a list of numbers), or None."""
    if not isinstance(hit, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in hit):
        return "not a list of numbers"
    return None


def _store(cache: Any, key: str, value: Any) -> None:
    """Store a paid-for reply; a failed write (disk full, a value the cache refuses, ...) is
    logged and the reply still returned."""
    try:
        cache.set(key, value)
    except (OSError, CacheValueError) as exc:
        log.warning("could not write the reply to the cache (%s); it is returned but not cached", exc)


class PlainClient(Client):
    """A :class:`Client` around any object with ``send_message(messages, **params) -> dict``.

    :func:`tinyllm.register_client` and ``LLMCall(client=...)`` wrap such objects
    in it, so the call layer talks to one interface. Calls go straight to the
    object (its own caching, queueing and retrying, if any, apply; ``accept`` is
    not passed on); ``asend_message`` runs ``send_message`` in a thread unless the
    object has its own; embeddings and token counting go to the object's methods
    when it has them. ``capabilities`` is the object's own declaration if it has
    one, else the defaults of :class:`Capabilities`.
    """

    def __init__(self, target: Any, api_type: str = "plain") -> None:
        super().__init__()
        self.target = target
        self.api_type = api_type
        self.capabilities = getattr(target, "capabilities", None) or Capabilities()

    def __repr__(self) -> str:
        return f"<PlainClient api_type={self.api_type!r} target={type(self.target).__name__}>"

    def request(self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any) -> Reply:
        """``target.send_message(messages, **params)`` as a :class:`Reply`; ResponseError unless it returns a message dict."""
        started = time.perf_counter()
        self.check_media(messages)
        return self._wrap(self.target.send_message(messages, **params), params, started)

    async def arequest(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> Reply:
        """``target.asend_message`` if it has one, else ``send_message`` in a worker thread."""
        started = time.perf_counter()
        self.check_media(messages)
        own = getattr(self.target, "asend_message", None)
        if own is not None:
            return self._wrap(await own(messages, **params), params, started)
        return self._wrap(await _to_thread(self.target.send_message, messages, **params), params, started)

    def _wrap(self, message: Any, params: dict, started: float) -> Reply:
        if not isinstance(message, dict) or "role" not in message:
            raise ResponseError(f"the client returned {type(message).__name__}, not a message dict", raw=message)
        return Reply(
            message=message,
            usage={},
            model=str(params.get("model") or ""),
            latency=time.perf_counter() - started,
            api_type=self.api_type,
            client=self,
        )

    def get_embeddings(self, texts: list[str], model: str | None = None) -> list[list[float]]:
        """``target.get_embeddings``; ConfigError when the object has none."""
        own = getattr(self.target, "get_embeddings", None)
        if own is None:
            raise ConfigError(f"the client registered as {self.api_type!r} has no get_embeddings()")
        return own(texts, model)

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        """``target.count_tokens`` if it has one, else tiktoken's count for ``model``."""
        own = getattr(self.target, "count_tokens", None)
        return int(own(messages, model)) if own is not None else tokens.count_tokens(messages, model)


def as_client(target: Any, api_type: str = "plain") -> Client:
    """``target`` itself if it is a :class:`Client`, else a :class:`PlainClient` around it.

    Raises:
        ConfigError: ``target`` has no ``send_message`` method.
    """
    if isinstance(target, Client):
        return target
    if not callable(getattr(target, "send_message", None)):
        raise ConfigError(
            f"a client must have a send_message(messages, **params) method; {type(target).__name__} has none"
        )
    return PlainClient(target, api_type)


class _StreamState:
    """What a stream shares with its generator, which must not refer to the stream object itself
    (a stream <-> generator cycle would keep an abandoned stream, and its request slot, alive until
    the cycle collector ran).

    Attributes:
        reply: the complete :class:`Reply` once the stream ended (or the cache hit), else None.
        releases: what the running request holds (its budget reservation, its queue slot), each
            released once, by whichever comes first: the stream's end, its closing, or its iterator
            dropped unfinished (a weakref finalizer, which never awaits: an abandoned async stream
            frees its slot at once, the connection is closed afterwards by the event loop).
    """

    __slots__ = ("reply", "releases", "__weakref__")

    def __init__(self, reply: Reply | None) -> None:
        self.reply = reply
        self.releases: list[Callable[[], None]] = []

    def release(self) -> None:
        """Run every pending release, last taken first; each runs once (list.pop is atomic)."""
        while True:
            try:
                release = self.releases.pop()
            except IndexError:
                return
            release()


class ReplyStream:
    """A streamed reply: iterate for its text deltas (``str``); :attr:`reply` once it has ended.

    Closing it early (``close()``, ``break`` out of a ``with`` block, an exception
    in the loop) closes the HTTP response and releases the request-queue slot at once;
    so does dropping it (or its iterator) unfinished.
    """

    def __init__(self, client: Client, req: _Request, hit: Reply | None) -> None:
        self.client, self.req = client, req
        self._state = _StreamState(hit)
        self._iter: Iterator[str] | None = None

    @property
    def reply(self) -> Reply | None:
        """The complete :class:`Reply` once the stream has ended (a cache hit: at once), else None."""
        return self._state.reply

    def __iter__(self) -> Iterator[str]:
        if self._iter is None:
            self._iter = _stream(self.client, self.req, self._state)
            weakref.finalize(self._iter, self._state.release)
        return self._iter

    def __enter__(self) -> "ReplyStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop: close the connection and give the queue slot back (no-op once ended)."""
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]

    def _abandon(self) -> None:
        """Give back what the request holds, now, without closing the connection (see :class:`_StreamState`)."""
        self._state.release()


class AsyncReplyStream:
    """The asyncio twin of :class:`ReplyStream`: ``async for delta in stream``; ``await stream.aclose()``.

    Dropped unfinished (a web handler whose client went away), it gives its request slot and budget
    reservation back at once; the event loop closes the connection soon after.
    """

    def __init__(self, client: Client, req: _Request, hit: Reply | None) -> None:
        self.client, self.req = client, req
        self._state = _StreamState(hit)
        self._iter: AsyncIterator[str] | None = None

    @property
    def reply(self) -> Reply | None:
        """The complete :class:`Reply` once the stream has ended (a cache hit: at once), else None."""
        return self._state.reply

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iter is None:
            self._iter = _astream(self.client, self.req, self._state)
            weakref.finalize(self._iter, self._state.release)
        return self._iter

    async def __aenter__(self) -> "AsyncReplyStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: close the connection and give the queue slot back."""
        if self._iter is not None:
            await self._iter.aclose()  # type: ignore[attr-defined]

    def _abandon(self) -> None:
        """Give back what the request holds, now, without awaiting (see :class:`_StreamState`)."""
        self._state.release()


def _stream(client: Client, req: _Request, state: _StreamState) -> Iterator[str]:
    """The generator behind :class:`ReplyStream` (it refers to the state, never to the stream)."""
    if state.reply is not None:  # a cache hit: the stored text at once
        if state.reply.message.get("content"):
            yield state.reply.message["content"]
        return
    client._measure(req)
    acc = Accumulator()
    with contextlib.ExitStack() as stack:
        stack.callback(state.release)  # last: after the connection is closed
        state.releases.append(
            budget.reserve(client, req)
        )  # budget: refused before sending when MAX_COST could be exceeded
        state.releases.append(client.queue.acquire(req.cfg, req.rate_tokens))

        def open_(n: int) -> tuple[contextlib.ExitStack, Iterator[dict], dict]:
            attempt = contextlib.ExitStack()  # the attempt's cluster-wide slot (Redis) and its connection
            try:
                attempt.enter_context(client.queue.lease(req.cfg, req.rate_tokens, client._scope(req)))
                with otel.attempt_span(req.model, n):  # otel: one span per HTTP attempt, to its first chunk
                    chunks = client._chat_stream(req.messages, client._attempt_params(req, n), req.cfg)
                    attempt.callback(_close, chunks)
                    return attempt, chunks, next(iter(chunks))
            except StopIteration:
                attempt.close()
                raise ResponseError("the stream ended before any chunk arrived") from None
            except BaseException:
                attempt.close()
                raise

        attempt, chunks, first = client.retrying(req.cfg).call(open_)
        stack.enter_context(attempt)
        try:
            delta = acc.add(first)
            if delta:
                yield delta
            for chunk in chunks:
                delta = acc.add(chunk)
                if delta:
                    yield delta
            _check_finished(acc)
        except TinyLLMError as exc:
            exc.partial = acc.text  # type: ignore[attr-defined]
            raise
    state.reply = client._finish_stream(req, acc)


async def _astream(client: Client, req: _Request, state: _StreamState) -> AsyncIterator[str]:
    """The async generator behind :class:`AsyncReplyStream` (it refers to the state, never to the stream)."""
    if state.reply is not None:
        if state.reply.message.get("content"):
            yield state.reply.message["content"]
        return
    client._measure(req)
    acc = Accumulator()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(state.release)  # last: after the connection is closed
        state.releases.append(
            await budget.areserve(client, req)
        )  # budget: refused before sending when MAX_COST could be exceeded
        state.releases.append(await client.queue.aacquire(req.cfg, req.rate_tokens))

        async def open_(n: int) -> tuple[contextlib.AsyncExitStack, AsyncIterator[dict], dict]:
            attempt = contextlib.AsyncExitStack()  # the attempt's cluster-wide slot (Redis) and its connection
            try:
                await attempt.enter_async_context(client.queue.alease(req.cfg, req.rate_tokens, client._scope(req)))
                with otel.attempt_span(req.model, n):  # otel: one span per HTTP attempt, to its first chunk
                    chunks = client._achat_stream(req.messages, client._attempt_params(req, n), req.cfg)
                    attempt.push_async_callback(_aclose, chunks)
                    return attempt, chunks, await chunks.__anext__()
            except StopAsyncIteration:
                await attempt.aclose()
                raise ResponseError("the stream ended before any chunk arrived") from None
            except BaseException:
                await attempt.aclose()
                raise

        attempt, chunks, first = await client.retrying(req.cfg).acall(open_)
        await stack.enter_async_context(attempt)
        try:
            delta = acc.add(first)
            if delta:
                yield delta
            async for chunk in chunks:
                delta = acc.add(chunk)
                if delta:
                    yield delta
            _check_finished(acc)
        except TinyLLMError as exc:
            exc.partial = acc.text  # type: ignore[attr-defined]
            raise
    state.reply = client._finish_stream(req, acc)


def _check_finished(acc: Accumulator) -> None:
    """A stream that ends without a finish_reason was cut off (the connection closed early):
    an APIConnectionError, never a silently shortened reply."""
    if acc.finish_reason is None:
        raise APIConnectionError("the stream ended before the server finished the reply (no finish_reason)")


def _without_stream(params: dict) -> dict:
    """``params`` less ``stream`` (a streamed and a plain request share one cache key)."""
    return {k: v for k, v in params.items() if k != "stream"}


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


async def _aclose(chunks: Any) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


async def _in_thread(open_stream: Callable[[], Iterator[dict]]) -> AsyncIterator[dict]:
    """Read a sync chunk iterator in a worker thread, one chunk per hop; closing this closes it there."""
    chunks = await _to_thread(open_stream)
    done = object()
    try:
        while True:
            chunk = await _to_thread(next, chunks, done)
            if chunk is done:
                return
            yield chunk  # type: ignore[misc]
    finally:
        await _to_thread(_close, chunks)

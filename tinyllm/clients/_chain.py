"""Fallbacks between clients: :class:`FallbackChain`, a client that sends each request to the first
of its clients that can answer.

``LLMCall(..., client=a, fallbacks=[b, c])`` (and ``LLMChat``, ``map``, ``tinyllm call --fallback``)
builds one. A request goes to ``a`` (through ``a``'s own cache, queue and retries); when it fails,
after those retries, with an error another client could serve (:data:`FALLBACK_ERRORS`: rate
limit, 5xx, timeout, connection error, context window exceeded), the same request goes to ``b``,
then ``c``. Any other error (400, 401, a budget stop, ...) is raised at once: it would fail
anywhere. A client that failed more than ``allowed_fails`` times within a minute is skipped for
``cooldown`` seconds (every client cooling down: they are tried anyway, in order). The state is
this object's: share one chain between calls to share it.

Each request works at the level of one request, as LiteLLM's Router does: within a tool loop,
only the failed request moves to the next client, the tool rounds already run are kept.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import (
    APIConnectionError,
    ConfigError,
    ContextWindowExceededError,
    RateLimitError,
    ServerError,
    TinyLLMError,
)
from ._base import Capabilities, Client, Reply, as_client

__all__ = ["ALLOWED_FAILS", "COOLDOWN", "FALLBACK_ERRORS", "Attempt", "FallbackChain", "Fallbacks", "check_fallbacks"]

#: the errors that move a request to the next client (APITimeoutError is an APIConnectionError)
FALLBACK_ERRORS: tuple[type[BaseException], ...] = (
    RateLimitError,
    ServerError,
    APIConnectionError,
    ContextWindowExceededError,
)
#: seconds a failing client is skipped (LiteLLM's Router: ``cooldown_time``; its default is 5 s, per
#: deployment attempt; here a failure comes after the client's own retries, so it weighs more)
COOLDOWN = 30.0
#: failures within FAIL_WINDOW seconds a client may have before it cools down (LiteLLM: ``allowed_fails``)
ALLOWED_FAILS = 1
FAIL_WINDOW = 60.0


@dataclass
class Attempt:
    """One client's failed try at a request of a call with fallbacks.

    Attributes:
        client (Client): the client that failed; ``api_type`` (str) its api_type.
        model (str | None): the model asked for (None: the client's own default).
        error (TinyLLMError): what it raised (after its own retries).
        latency (float): seconds the try took; ``time`` (float): Unix time it ended.
        skipped (bool): not tried, the client was cooling down (``error`` None then).
    """

    client: Any = field(repr=False)
    api_type: str
    model: str | None
    error: BaseException | None
    latency: float = 0.0
    time: float = 0.0
    skipped: bool = False
    params: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: api_type, model, error ``{"type", "message"}`` or None, latency, time, skipped."""
        return {
            "api_type": self.api_type,
            "model": self.model,
            "latency": self.latency,
            "time": self.time,
            "skipped": self.skipped,
            "error": {"type": type(self.error).__name__, "message": str(self.error)}
            if self.error is not None
            else None,
        }


@dataclass
class _Entry:
    client: Client
    model: str | None  # a model given with the fallback ("gpt-4o-mini", "ollama:llama3"), else None
    primary: bool
    failures: deque = field(default_factory=deque)  # monotonic times of recent failures
    cool_until: float = 0.0

    def params(self, params: dict) -> dict:
        """The request's parameters for this entry: the primary's as given; a fallback's with its own model
        (the one given with it, else none: the client's own ``model`` setting, else MODEL)."""
        if self.primary and self.model is None:
            return params
        out = {k: v for k, v in params.items() if k != "model"}
        if self.model is not None:
            out["model"] = self.model
        return out

    def label(self) -> str:
        return f"{self.client.api_type}:{self.model}" if self.model else self.client.api_type


class FallbackChain(Client):
    """A client that tries its clients in order: the first is the primary, the others its fallbacks.

    Args:
        primary: a :class:`Client` (or an object with ``send_message``), or a str as for ``fallbacks``.
        *fallbacks: each a :class:`Client`, an object with ``send_message``, or a str: a registered
            api_type (``"ollama"``: that client with its own model), ``"API_TYPE:MODEL"`` (that client
            with that model), or a model name (the primary client with that model).
        cooldown: seconds a failing client is skipped (default :data:`COOLDOWN`).
        allowed_fails: failures within a minute a client may have before it cools down (default
            :data:`ALLOWED_FAILS`; 0: cool down at the first).
        fallback_on: the error classes that move a request on (default :data:`FALLBACK_ERRORS`).

    A fallback answers with its own model, never the primary's ``model`` parameter (it may not
    exist there); every other parameter is passed on. ``capabilities`` are what every client of the
    chain can do (so output types and tools are planned for all of them). Settings, cache and
    token counting are the primary's; each client keeps its own cache, queue and retries.

    Raises:
        ConfigError: no client, a str naming nothing, or a negative cooldown / allowed_fails.
    """

    api_type = "fallbacks"

    def __init__(
        self,
        primary: Any,
        *fallbacks: Any,
        cooldown: float = COOLDOWN,
        allowed_fails: int = ALLOWED_FAILS,
        fallback_on: Iterable[type[BaseException]] = FALLBACK_ERRORS,
    ) -> None:
        if cooldown < 0 or allowed_fails < 0:
            raise ConfigError("cooldown and allowed_fails must be >= 0")
        first = _entry(primary, None, primary=True)
        self.entries = [first, *(_entry(f, first.client, primary=False) for f in fallbacks)]
        self.cooldown = float(cooldown)
        self.allowed_fails = int(allowed_fails)
        self.fallback_on = tuple(fallback_on)
        self.api_type = first.client.api_type
        self.queue = first.client.queue
        self._lock = threading.Lock()
        caps = [e.client.capabilities for e in self.entries]
        self.capabilities = Capabilities(
            **{name: all(getattr(c, name) for c in caps) for name in Capabilities.__dataclass_fields__}
        )

    def __repr__(self) -> str:
        return f"<FallbackChain {' -> '.join(e.label() for e in self.entries)}>"

    @property
    def clients(self) -> list[Client]:
        """The clients in the order they are tried (the primary first)."""
        return [e.client for e in self.entries]

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "queue")}
        state["entries"] = [_Entry(e.client, e.model, e.primary) for e in self.entries]  # cooldowns stay here
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self.queue = self.entries[0].client.queue

    # -- what the call layer asks of a client: the primary's ---------------------------------------
    def settings(self) -> Config:
        return self.entries[0].client.settings()

    def resolve_params(self, params: dict, cfg: Config) -> dict:
        return self.entries[0].client.resolve_params(params, cfg)

    def endpoint(self, cfg: Config, model: str) -> dict:
        return self.entries[0].client.endpoint(cfg, model)

    def cache(self, cfg: Config) -> Any:
        return self.entries[0].client.cache(cfg)

    def count_tokens(self, messages: list[dict], model: str, cfg: Config | None = None) -> int:
        return self.entries[0].client.count_tokens(messages, model, cfg)

    def context_window(self, model: str, cfg: Config | None = None) -> int | None:
        return self.entries[0].client.context_window(model, cfg)

    def get_embeddings(self, texts: list[str], model: str | None = None) -> list[list[float]]:
        return self.entries[0].client.get_embeddings(texts, model)

    @property
    def _secrets(self) -> dict:  # type: ignore[override]  # the call log masks every client's keys
        out: dict = {}
        for e in self.entries:
            out.update({f"{i}:{k}": v for i, (k, v) in enumerate(getattr(e.client, "_secrets", {}).items())})
        return out

    def params_for(self, client: Any, params: dict) -> dict:
        """The parameters ``client`` (one of the chain's) was sent for a call given ``params``."""
        for e in self.entries:
            if e.client is client:
                return e.params(params)
        return params

    # -- the order and the cooldowns -----------------------------------------------------------------
    def _order(self) -> tuple[list[_Entry], list[_Entry]]:
        """(entries to try, in order; entries skipped because they are cooling down)."""
        now = time.monotonic()
        with self._lock:
            ready = [e for e in self.entries if e.cool_until <= now]
        if not ready:  # every client cools down: try them all rather than fail without trying
            return list(self.entries), []
        return ready, [e for e in self.entries if e not in ready]

    def _failed(self, entry: _Entry, exc: BaseException) -> None:
        if isinstance(exc, ContextWindowExceededError):
            return  # the request was too long, not the client broken
        now = time.monotonic()
        with self._lock:
            entry.failures.append(now)
            while entry.failures and entry.failures[0] < now - FAIL_WINDOW:
                entry.failures.popleft()
            if len(entry.failures) > self.allowed_fails:
                entry.cool_until = now + self.cooldown
                entry.failures.clear()

    def _succeeded(self, entry: _Entry) -> None:
        if entry.failures:
            with self._lock:
                entry.failures.clear()

    def cooling_down(self) -> list[Client]:
        """The clients being skipped now (their cooldown has not ended)."""
        now = time.monotonic()
        with self._lock:
            return [e.client for e in self.entries if e.cool_until > now]

    def reset(self) -> None:
        """Forget every failure and cooldown."""
        with self._lock:
            for e in self.entries:
                e.failures.clear()
                e.cool_until = 0.0

    def _attempt(
        self, entry: _Entry, exc: BaseException | None, started: float, params: dict, skipped: bool = False
    ) -> Attempt:
        latency = time.perf_counter() - started
        try:  # the model the client asked for (its own default when the params name none)
            model = entry.client.resolve_params(params, entry.client.settings()).get("model")
        except TinyLLMError:
            model = params.get("model")
        return Attempt(entry.client, entry.client.api_type, model, exc, latency, time.time(), skipped, params)

    def _give_up(self, exc: BaseException, attempts: list[Attempt]) -> BaseException:
        try:
            exc.attempts = attempts  # type: ignore[attr-defined]
        except AttributeError:  # an exception that takes no attributes
            pass
        return exc

    def _plan(self) -> tuple[list[_Entry], list[Attempt]]:
        order, skipped = self._order()
        return order, [self._attempt(e, None, time.perf_counter(), e.params({}), skipped=True) for e in skipped]

    # -- requests ------------------------------------------------------------------------------------
    def request(self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any) -> Reply:
        """Send to the first client that answers (see the class). Returns its :class:`Reply`, whose
        ``client`` is that client and ``attempts`` the failed tries before it.

        Raises:
            the last client's error when none answered, or at once an error not in ``fallback_on``;
            either carries ``.attempts`` (``list[Attempt]``, the failed tries, the last one included).
        """
        order, attempts = self._plan()
        for i, entry in enumerate(order):
            sent = entry.params(params)
            started = time.perf_counter()
            try:
                reply = entry.client.request(messages, accept=accept, **sent)
            except self.fallback_on as exc:
                self._failed(entry, exc)
                attempts.append(self._attempt(entry, exc, started, sent))
                if i == len(order) - 1:
                    raise self._give_up(exc, attempts) from None
                continue
            except TinyLLMError as exc:
                attempts.append(self._attempt(entry, exc, started, sent))
                raise self._give_up(exc, attempts) from None
            self._succeeded(entry)
            return _answered(reply, entry, attempts)
        raise AssertionError("unreachable")

    async def arequest(
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> Reply:
        """The asyncio twin of :meth:`request`."""
        order, attempts = self._plan()
        for i, entry in enumerate(order):
            sent = entry.params(params)
            started = time.perf_counter()
            try:
                reply = await entry.client.arequest(messages, accept=accept, **sent)
            except self.fallback_on as exc:
                self._failed(entry, exc)
                attempts.append(self._attempt(entry, exc, started, sent))
                if i == len(order) - 1:
                    raise self._give_up(exc, attempts) from None
                continue
            except TinyLLMError as exc:
                attempts.append(self._attempt(entry, exc, started, sent))
                raise self._give_up(exc, attempts) from None
            self._succeeded(entry)
            return _answered(reply, entry, attempts)
        raise AssertionError("unreachable")

    def stream_request(  # type: ignore[override]  # a stream of the same shape (iteration, close, reply), not a ReplyStream
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> _ChainStream:
        """A streamed request that moves to the next client when one fails before its first text delta
        (after that, the error is raised with ``.partial`` as for any stream)."""
        return _ChainStream(self, messages, accept, params)

    def astream_request(  # type: ignore[override]  # a stream of the same shape (async iteration, aclose, reply), not an AsyncReplyStream
        self, messages: list[dict], *, accept: Callable[[dict], bool] | None = None, **params: Any
    ) -> _ChainStream:
        """The asyncio twin of :meth:`stream_request`."""
        return _ChainStream(self, messages, accept, params)


def _answered(reply: Reply, entry: _Entry, attempts: list[Attempt]) -> Reply:
    reply.client = entry.client
    reply.attempts = attempts
    return reply


class _ChainState:
    """What a :class:`_ChainStream` shares with its generator: the reply, and the client stream now read
    (given back at once when the whole stream is dropped unfinished)."""

    __slots__ = ("reply", "current", "__weakref__")

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.current: Any = None

    def abandon(self) -> None:
        current = self.current
        abandon = getattr(current, "_abandon", None)
        if abandon is not None:
            abandon()


class _ChainStream:
    """The stream of a :class:`FallbackChain`: each client's stream in turn until one yields.

    Its generator refers to no stream object (no reference cycle): dropped unfinished, the client
    stream it was reading gives its request slot back at once, as a client's own stream does.
    """

    def __init__(self, chain: FallbackChain, messages: list[dict], accept: Any, params: dict) -> None:
        self._args = (chain, messages, accept, params)
        self._state = _ChainState()
        self._iter: Any = None

    @property
    def reply(self) -> Reply | None:
        return self._state.reply

    def __iter__(self) -> Any:
        if self._iter is None:
            self._iter = _chain_stream(*self._args, self._state)
            weakref.finalize(self._iter, self._state.abandon)
        return self._iter

    def __aiter__(self) -> Any:
        if self._iter is None:
            self._iter = _achain_stream(*self._args, self._state)
            weakref.finalize(self._iter, self._state.abandon)
        return self._iter

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()

    async def aclose(self) -> None:
        if self._iter is not None:
            await self._iter.aclose()

    def _abandon(self) -> None:
        self._state.abandon()


def _chain_stream(chain: FallbackChain, messages: list[dict], accept: Any, params: dict, state: _ChainState) -> Any:
    """The generator behind :class:`_ChainStream` (it holds no reference to the stream object)."""
    order, attempts = chain._plan()
    for i, entry in enumerate(order):
        sent = entry.params(params)
        started = time.perf_counter()
        stream = None
        yielded = False
        try:
            stream = entry.client.stream_request(messages, accept=accept, **sent)
            state.current = stream
            for delta in stream:
                yielded = True
                yield delta
        except chain.fallback_on as exc:
            chain._failed(entry, exc)
            attempts.append(chain._attempt(entry, exc, started, sent))
            if yielded or i == len(order) - 1:
                raise chain._give_up(exc, attempts) from None
            continue
        except TinyLLMError as exc:
            attempts.append(chain._attempt(entry, exc, started, sent))
            raise chain._give_up(exc, attempts) from None
        finally:
            if stream is not None:
                stream.close()
        chain._succeeded(entry)
        done = stream.reply
        assert done is not None  # a stream that ended has its reply
        state.reply = _answered(done, entry, attempts)
        return


async def _achain_stream(
    chain: FallbackChain, messages: list[dict], accept: Any, params: dict, state: _ChainState
) -> Any:
    """The asyncio twin of :func:`_chain_stream`."""
    order, attempts = chain._plan()
    for i, entry in enumerate(order):
        sent = entry.params(params)
        started = time.perf_counter()
        stream = None
        yielded = False
        try:
            stream = entry.client.astream_request(messages, accept=accept, **sent)
            state.current = stream
            async for delta in stream:
                yielded = True
                yield delta
        except chain.fallback_on as exc:
            chain._failed(entry, exc)
            attempts.append(chain._attempt(entry, exc, started, sent))
            if yielded or i == len(order) - 1:
                raise chain._give_up(exc, attempts) from None
            continue
        except TinyLLMError as exc:
            attempts.append(chain._attempt(entry, exc, started, sent))
            raise chain._give_up(exc, attempts) from None
        finally:
            if stream is not None:
                await stream.aclose()
        chain._succeeded(entry)
        done = stream.reply
        assert done is not None  # a stream that ended has its reply
        state.reply = _answered(done, entry, attempts)
        return


def _entry(spec: Any, first: Client | None, *, primary: bool) -> _Entry:
    """A chain entry for ``spec`` (see :class:`FallbackChain`); ``first``: the primary's client (None for the primary).

    Raises:
        ConfigError: ``spec`` is an empty str, or an object that is no client.
    """
    if isinstance(spec, str):
        from . import get_client as registered
        from . import default_registry

        if not spec:
            raise ConfigError("a fallback must be a client, an api_type or a model name, not ''")
        api_type, sep, model = spec.partition(":")
        if default_registry._known(api_type.lower()) or _plugin_knows(api_type.lower()):
            return _Entry(registered(api_type.lower()), model if sep and model else None, primary)
        if first is None:  # the primary given as a model name: the default client with that model
            return _Entry(registered(), spec, primary)
        return _Entry(first, spec, primary)  # a model name: the primary's client with that model
    if isinstance(spec, FallbackChain):
        raise ConfigError("a FallbackChain cannot be one of another chain's clients; list its clients instead")
    return _Entry(as_client(spec), None, primary)


def _plugin_knows(api_type: str) -> bool:
    from . import default_registry

    default_registry._from_plugins(api_type)
    return default_registry._known(api_type)


def check_fallbacks(fallbacks: Any) -> list | None:
    """``fallbacks`` as given to LLMCall / LLMChat, checked: None or a list of clients and strs.

    Raises:
        ConfigError: not a list (a single str is taken as a list of one), an empty str, or an
            item that is neither a str nor a client (an object with ``send_message``).
    """
    if fallbacks is None:
        return None
    items = [fallbacks] if isinstance(fallbacks, (str, Client)) else list(fallbacks)
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ConfigError("a fallback must be a client, an api_type or a model name, not ''")
        elif isinstance(item, FallbackChain):
            raise ConfigError("a FallbackChain cannot be a fallback; give its clients")
        else:
            as_client(item)  # ConfigError for an object that is no client
    return items or None


class Fallbacks:
    """What an LLMCall or LLMChat with ``fallbacks=`` sends through: one :class:`FallbackChain`, kept
    (with its cooldowns) while the primary client stays the same, built again when it changes (a
    primary from the registry follows ``API_TYPE``)."""

    def __init__(self, fallbacks: list) -> None:
        self.fallbacks = fallbacks
        self._chain: FallbackChain | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"fallbacks": self.fallbacks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["fallbacks"])  # type: ignore[misc]

    def sender(self, primary: Client) -> FallbackChain:
        """The chain whose primary is ``primary``."""
        chain = self._chain
        if chain is not None and chain.entries[0].client is primary:
            return chain
        with self._lock:
            if self._chain is None or self._chain.entries[0].client is not primary:
                self._chain = FallbackChain(primary, *self.fallbacks)
            return self._chain

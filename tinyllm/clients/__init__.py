"""The client registry: which client answers a call.

Choice, first match wins: ``force_api_type()`` > the ``api_type`` asked for >
the ``API_TYPE`` setting > auto-detection (``azure`` if AZURE_OPENAI_ENDPOINT
is set; ``openai`` if OPENAI_API_KEY or BASE_URL/OPENAI_BASE_URL is set;
``anthropic`` if ANTHROPIC_API_KEY is set; ``llamacpp`` if the ``local`` extra is installed; else a ConfigError that
names every way to fix it).

An api_type that is neither built in nor registered loads the installed plugins
(entry-point group ``tinyllm.plugins``, see :mod:`tinyllm.clients._plugins`) once,
then is looked up again.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

from .._fork import reset_in_child
from ..config import Config, get_config
from ..errors import ConfigError
from ._base import CallInfo, Capabilities, Client, PlainClient, as_client, last_call_info

__all__ = [
    "Client",
    "Capabilities",
    "PlainClient",
    "CallInfo",
    "Registry",
    "default_registry",
    "get_client",
    "client",
    "register_client",
    "force_api_type",
    "detect_api_type",
    "last_call_info",
    "as_client",
]


def _openai() -> Client:
    from .openai import OpenAIClient

    return OpenAIClient()


def _ollama() -> Client:
    from .openai import OllamaClient

    return OllamaClient()


def _azure() -> Client:
    from .azure import AzureClient

    return AzureClient()


def _anthropic() -> Client:
    from .anthropic import AnthropicClient

    return AnthropicClient()


def _llamacpp() -> Client:
    from .llamacpp import LlamaCppClient

    return LlamaCppClient()


_factories: dict[str, Callable[[], Client]] = {
    "openai": _openai,
    "ollama": _ollama,
    "azure": _azure,
    "llamacpp": _llamacpp,
    "anthropic": _anthropic,
}


class Registry:
    """Which client object answers for each api_type: the defaults for code that passes no client.

    Built-in clients (``openai``, ``ollama``, ``azure``, ``llamacpp``, ``anthropic``) are built on
    first use with no settings of their own (so they follow the configuration);
    :meth:`register` replaces or adds one; :meth:`force` sends every call to one.
    The package keeps one, :data:`default_registry`, behind :func:`get_client`,
    :func:`register_client` and :func:`force_api_type`.
    """

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._classes: dict[str, type] = {}  # registered Client subclasses, built on first use
        self._built: set[int] = set()  # id() of the clients built here from a factory (closed by reset())
        self._forced: str | None = None
        self._new_lock()
        reset_in_child(self._new_lock)  # a lock held at fork() is released in the child

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def register(self, api_type: str, target: Any) -> Client | None:
        """See :func:`register_client`; returns the :class:`Client` now registered (None for a Client
        subclass, which is built on first use)."""
        if not api_type or not isinstance(api_type, str):
            raise ConfigError("api_type must be a non-empty string")
        name = api_type.lower()
        if isinstance(target, type):
            if not issubclass(target, Client):
                raise ConfigError(
                    f"register_client({api_type!r}, ...) takes a Client subclass, a client object or an "
                    f"object with send_message(); {target.__name__} is a class of neither kind"
                )
            with self._lock:
                self._clients.pop(name, None)
                self._classes[name] = target
            return None  # built on first use
        found = as_client(target, name)
        with self._lock:
            self._classes.pop(name, None)
            replaced = self._clients.get(name)
            self._clients[name] = found
            if replaced is not None and id(replaced) in self._built and replaced is not found:
                self._built.discard(id(replaced))
            else:
                replaced = None
        if replaced is not None:
            replaced.close()  # a client built here and now replaced: nobody else holds it
        return found

    def registered(self) -> list[str]:
        """The api_types registered with :meth:`register` (objects and classes), sorted; built-ins not included
        unless built or replaced."""
        with self._lock:
            return sorted(set(self._clients) | set(self._classes))

    def _known(self, api_type: str) -> bool:
        return api_type in _factories or api_type in self._clients or api_type in self._classes

    def force(self, api_type: str | None) -> None:
        """See :func:`force_api_type`."""
        if api_type is not None:
            self._check_known(api_type.lower(), plugins=True)
        self._forced = api_type.lower() if api_type else None

    def reset(self) -> None:
        """Forget registered and built clients and any forced api_type; the built ones are closed
        (their connection pools), the registered ones belong to their owner and are left open."""
        with self._lock:
            built = [c for c in self._clients.values() if id(c) in self._built]
            self._clients.clear()
            self._classes.clear()
            self._built.clear()
            self._forced = None
        for found in built:
            found.close()

    def _check_known(self, api_type: str, plugins: bool = False) -> None:
        if self._known(api_type):
            return
        if plugins:
            self._from_plugins(api_type)
            if self._known(api_type):
                return
        known = sorted(set(_factories) | set(self._clients) | set(self._classes))
        raise ConfigError(
            f"unknown api_type {api_type!r}; known: {', '.join(known)} (or register_client() your own, "
            "or install a tinyllm plugin that adds it)"
        )

    def _from_plugins(self, api_type: str) -> None:
        """Load the installed plugins (once per process); a client a plugin registered that this registry
        lost since (:meth:`reset`) is registered again."""
        from ._plugins import load_plugins, registered_by_plugins

        load_plugins()
        target = registered_by_plugins().get(api_type)
        if target is not None and not self._known(api_type):
            self.register(api_type, target)

    def api_types(self) -> list[str]:
        """The api_type names this registry answers for (built-in and registered), sorted."""
        return sorted(set(_factories) | set(self._clients))

    def client(self, api_type: str | None = None) -> Client:
        """See :func:`get_client`."""
        forced = self._forced
        cfg = get_config() if forced is None and api_type is None else None
        chosen = forced or (api_type.lower() if api_type else None) or (cfg.api_type if cfg else None)
        if chosen is None:
            chosen = detect_api_type(cfg)  # type: ignore[arg-type]
        found = self._clients.get(chosen)
        if found is not None:
            return found
        self._check_known(chosen, plugins=True)
        with self._lock:
            if chosen not in self._clients:
                cls = self._classes.get(chosen)
                self._clients[chosen] = made = cls() if cls is not None else _factories[chosen]()
                self._built.add(id(made))
            return self._clients[chosen]


#: the registry behind :func:`get_client`, :func:`register_client` and :func:`force_api_type`
default_registry = Registry()


def register_client(api_type: str, client: Any) -> None:
    """Make ``client`` answer for ``api_type`` (str, case-insensitive), replacing a built-in of that name.

    ``client`` is a :class:`tinyllm.Client` (for example ``OpenAIClient(base_url=...,
    api_key=...)``, or a subclass of your own, which gets the cache, queue and
    retry pipeline), a :class:`tinyllm.Client` subclass (built with no arguments
    on first use, so it follows the configuration: what plugins register), or any
    object with ``send_message(messages: list[dict], **params) -> dict``, which is
    wrapped in a :class:`PlainClient`.

    Raises:
        ConfigError: an empty ``api_type``, a class that is not a Client subclass,
            or a ``client`` without ``send_message``.
    """
    default_registry.register(api_type, client)


def force_api_type(api_type: str | None) -> None:
    """Send every call to ``api_type`` whatever else is asked or configured; None lifts it.

    Raises:
        ConfigError: ``api_type`` is not registered.
    """
    default_registry.force(api_type)


def detect_api_type(cfg: Config) -> str:
    """The api_type auto-detection picks for these settings (see the module docstring).

    Raises:
        ConfigError: nothing is configured and the local extra is not installed.
    """
    if cfg.secret("AZURE_OPENAI_ENDPOINT"):
        return "azure"
    if cfg.secret("OPENAI_API_KEY", "OPENAI_BASE_URL") or cfg.base_url:
        return "openai"
    if cfg.secret("ANTHROPIC_API_KEY"):
        return "anthropic"
    from .llamacpp import local_available

    if local_available():
        return "llamacpp"
    raise ConfigError(
        "no LLM backend configured. Either: set OPENAI_API_KEY (OpenAI); set BASE_URL or OPENAI_BASE_URL "
        "(an OpenAI-compatible server such as Ollama, vLLM or llama.cpp server); set AZURE_OPENAI_ENDPOINT "
        "and AZURE_OPENAI_KEY (Azure OpenAI); set ANTHROPIC_API_KEY (Claude, with pip install 'tinyllm[anthropic]'); or pip install 'tinyllm[local]' for the embedded model"
    )


def get_client(api_type: str | None = None) -> Client:
    """The client that answers for ``api_type`` (or the forced, configured or detected one).

    The choice, first match wins: :func:`force_api_type` > ``api_type`` > the
    ``API_TYPE`` setting > auto-detection (see :func:`detect_api_type`). The
    same object is returned on every call for the same api_type (it holds the
    queue and the cache of the default client).

    Raises:
        ConfigError: unknown api_type, or nothing configured (see :func:`detect_api_type`).
    """
    return default_registry.client(api_type)


def client(api_type: str | None = None) -> Client:
    """Deprecated alias of :func:`get_client` (renamed in 0.2: a module-level ``client`` was shadowed
    by every local variable of that name). Warns with ``DeprecationWarning``; returns the same object.
    """
    warnings.warn("tinyllm.client() is deprecated; use tinyllm.get_client()", DeprecationWarning, stacklevel=2)
    return default_registry.client(api_type)

"""The client registry: which client answers a call.

Choice, first match wins: ``force_api_type()`` > the ``api_type`` asked for >
the ``API_TYPE`` setting > auto-detection (``azure`` if AZURE_OPENAI_ENDPOINT
is set; ``openai`` if OPENAI_API_KEY or BASE_URL/OPENAI_BASE_URL is set;
``llamacpp`` if the ``local`` extra is installed; else a ConfigError that
names every way to fix it).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

from .._fork import reset_in_child
from ..config import Config, get_config
from ..errors import ConfigError
from ._base import CallInfo, Capabilities, Client, PlainClient, as_client, last_call_info

__all__ = ["Client", "Capabilities", "PlainClient", "CallInfo", "Registry", "default_registry", "get_client", "client",
           "register_client", "force_api_type", "detect_api_type", "last_call_info", "as_client"]


def _openai() -> Client:
    from .openai import OpenAIClient

    return OpenAIClient()


def _ollama() -> Client:
    from .openai import OllamaClient

    return OllamaClient()


def _azure() -> Client:
    from .azure import AzureClient

    return AzureClient()


def _llamacpp() -> Client:
    from .llamacpp import LlamaCppClient

    return LlamaCppClient()


_factories: dict[str, Callable[[], Client]] = {"openai": _openai, "ollama": _ollama, "azure": _azure, "llamacpp": _llamacpp}


class Registry:
    """Which client object answers for each api_type: the defaults for code that passes no client.

    Built-in clients (``openai``, ``ollama``, ``azure``, ``llamacpp``) are built on
    first use with no settings of their own (so they follow the configuration);
    :meth:`register` replaces or adds one; :meth:`force` sends every call to one.
    The package keeps one, :data:`default_registry`, behind :func:`get_client`,
    :func:`register_client` and :func:`force_api_type`.
    """

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._built: set[int] = set()  # id() of the clients built here from a factory (closed by reset())
        self._forced: str | None = None
        self._new_lock()
        reset_in_child(self._new_lock)  # a lock held at fork() is released in the child

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def register(self, api_type: str, target: Any) -> Client:
        """See :func:`register_client`; returns the :class:`Client` now registered."""
        if not api_type or not isinstance(api_type, str):
            raise ConfigError("api_type must be a non-empty string")
        found = as_client(target, api_type.lower())
        with self._lock:
            replaced = self._clients.get(api_type.lower())
            self._clients[api_type.lower()] = found
            if replaced is not None and id(replaced) in self._built and replaced is not found:
                self._built.discard(id(replaced))
            else:
                replaced = None
        if replaced is not None:
            replaced.close()  # a client built here and now replaced: nobody else holds it
        return found

    def force(self, api_type: str | None) -> None:
        """See :func:`force_api_type`."""
        if api_type is not None:
            self._check_known(api_type.lower())
        self._forced = api_type.lower() if api_type else None

    def reset(self) -> None:
        """Forget registered and built clients and any forced api_type; the built ones are closed
        (their connection pools), the registered ones belong to their owner and are left open."""
        with self._lock:
            built = [c for c in self._clients.values() if id(c) in self._built]
            self._clients.clear()
            self._built.clear()
            self._forced = None
        for found in built:
            found.close()

    def _check_known(self, api_type: str) -> None:
        if api_type not in _factories and api_type not in self._clients:
            known = sorted(set(_factories) | set(self._clients))
            raise ConfigError(f"unknown api_type {api_type!r}; known: {', '.join(known)} (or register_client() your own)")

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
        self._check_known(chosen)
        with self._lock:
            if chosen not in self._clients:
                self._clients[chosen] = made = _factories[chosen]()
                self._built.add(id(made))
            return self._clients[chosen]


#: the registry behind :func:`get_client`, :func:`register_client` and :func:`force_api_type`
default_registry = Registry()


def register_client(api_type: str, client: Any) -> None:
    """Make ``client`` answer for ``api_type`` (str, case-insensitive), replacing a built-in of that name.

    ``client`` is a :class:`tinyllm.Client` (for example ``OpenAIClient(base_url=...,
    api_key=...)``, or a subclass of your own, which gets the cache, queue and
    retry pipeline), or any object with ``send_message(messages: list[dict],
    **params) -> dict``, which is wrapped in a :class:`PlainClient`.

    Raises:
        ConfigError: an empty ``api_type``, or a ``client`` without ``send_message``.
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
    from .llamacpp import local_available

    if local_available():
        return "llamacpp"
    raise ConfigError(
        "no LLM backend configured. Either: set OPENAI_API_KEY (OpenAI); set BASE_URL or OPENAI_BASE_URL "
        "(an OpenAI-compatible server such as Ollama, vLLM or llama.cpp server); set AZURE_OPENAI_ENDPOINT "
        "and AZURE_OPENAI_KEY (Azure OpenAI); or pip install 'tinyllm[local]' for the embedded model"
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

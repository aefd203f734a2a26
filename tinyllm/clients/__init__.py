"""The client registry: which client answers a call.

Choice, first match wins: ``force_api_type()`` > the ``api_type`` asked for >
the ``API_TYPE`` setting > auto-detection (``azure`` if AZURE_OPENAI_ENDPOINT
is set; ``openai`` if OPENAI_API_KEY or BASE_URL/OPENAI_BASE_URL is set;
``llamacpp`` if the ``local`` extra is installed; else a ConfigError that
names every way to fix it).
"""

from __future__ import annotations

import threading
from typing import Callable

from ..config import Config, get_config
from ..errors import ConfigError
from .base import CallInfo, Client, last_call_info

__all__ = ["Client", "CallInfo", "client", "register_client", "force_api_type", "detect_api_type", "last_call_info"]


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
_clients: dict[str, Client] = {}
_forced: str | None = None
_lock = threading.Lock()


def register_client(api_type: str, client: Client) -> None:
    """Make ``client`` answer for ``api_type`` (str, case-insensitive), replacing a built-in of that name.

    ``client`` is any object with ``send_message(messages: list[dict], **params) -> dict``
    (subclass :class:`tinyllm.Client` to get the cache, queue and retry pipeline).

    Raises:
        ConfigError: an empty ``api_type``, or a ``client`` without ``send_message``.
    """
    if not api_type or not isinstance(api_type, str):
        raise ConfigError("api_type must be a non-empty string")
    if not callable(getattr(client, "send_message", None)):
        raise ConfigError(f"a client for {api_type!r} must have a send_message(messages, **params) method")
    with _lock:
        _clients[api_type.lower()] = client


def force_api_type(api_type: str | None) -> None:
    """Send every call to ``api_type`` whatever else is asked or configured; None lifts it.

    Raises:
        ConfigError: ``api_type`` is not registered.
    """
    global _forced
    if api_type is not None:
        _check_known(api_type.lower())
    _forced = api_type.lower() if api_type else None


def _check_known(api_type: str) -> None:
    if api_type not in _factories and api_type not in _clients:
        known = sorted(set(_factories) | set(_clients))
        raise ConfigError(f"unknown api_type {api_type!r}; known: {', '.join(known)} (or register_client() your own)")


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


def client(api_type: str | None = None) -> Client:
    """The client that answers for ``api_type`` (or the forced, configured or detected one).

    Raises:
        ConfigError: unknown api_type, or nothing configured (see :func:`detect_api_type`).
    """
    cfg = get_config() if _forced is None and api_type is None else None
    chosen = _forced or (api_type.lower() if api_type else None) or (cfg.api_type if cfg else None)
    if chosen is None:
        chosen = detect_api_type(cfg)  # type: ignore[arg-type]
    found = _clients.get(chosen)
    if found is not None:
        return found
    _check_known(chosen)
    with _lock:
        if chosen not in _clients:
            _clients[chosen] = _factories[chosen]()
        return _clients[chosen]

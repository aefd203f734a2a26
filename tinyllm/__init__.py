"""tinyllm: template-driven LLM calls.

>>> from tinyllm import LLMCall
>>> summarize = LLMCall("summarize.system.md", temperature=0)
>>> summarize.call(text="...")  # -> str, the reply's content

Importing tinyllm loads neither the openai SDK, nor tiktoken's encodings, nor
llama-cpp: each is loaded on first use.
"""

from __future__ import annotations

from .cache._store import force_api_cache
from .call import LLMCall
from .chat import LLMChat
from .clients import (
    CallInfo,
    Capabilities,
    Client,
    PlainClient,
    client,
    force_api_type,
    get_client,
    last_call_info,
    register_client,
)
from .config import configure, get_config
from .media import Audio, File, Image
from .response import Choice, Response
from .errors import *  # noqa: F403  (the error tree, errors.__all__)
from .errors import __all__ as _error_names
from .tokens import count_tokens
from .tools import Tool, ToolCall, ToolRound, tool
from .observe._usage import reset_usage_stats, usage_stats

__version__ = "0.1.0"

__all__ = [
    "LLMCall",
    "LLMChat",
    "Response",
    "Choice",
    "Image",
    "Audio",
    "File",
    "Runner",
    "evaluate",
    "BatchAPIRunner",
    "Tool",
    "ToolCall",
    "ToolRound",
    "tool",
    "Client",
    "Capabilities",
    "PlainClient",
    "OpenAIClient",
    "OllamaClient",
    "AzureClient",
    "LlamaCppClient",
    "AnthropicClient",
    "CallInfo",
    "get_client",
    "client",
    "register_client",
    "load_plugins",
    "PluginWarning",
    "FallbackChain",
    "MCPServer",
    "force_api_type",
    "force_api_cache",
    "last_call_info",
    "configure",
    "get_config",
    "count_tokens",
    "get_embedding",
    "get_embeddings",
    "usage_stats",
    "reset_usage_stats",
    *_error_names,
]


_LAZY = {  # client classes, the batch runner and evaluate, imported on first use so `import tinyllm` stays light
    "Runner": "tinyllm.batch._runner",
    "evaluate": "tinyllm.eval._run",  # prompt evaluation (tinyllm eval); its statistics need scipy (the eval extra)
    "BatchAPIRunner": "tinyllm.batch._batch_api",
    "OpenAIClient": "tinyllm.clients.openai",
    "OllamaClient": "tinyllm.clients.openai",
    "AzureClient": "tinyllm.clients.azure",
    "LlamaCppClient": "tinyllm.clients.llamacpp",
    "PluginWarning": "tinyllm.clients._plugins",
    "FallbackChain": "tinyllm.clients._chain",
    "MCPServer": "tinyllm._mcp",
    "AnthropicClient": "tinyllm.clients.anthropic",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tinyllm' has no attribute {name!r}")


def load_plugins() -> list:
    """Load the installed plugins (entry-point group ``tinyllm.plugins``) now, once per process.

    Plugins load by themselves on first use (an api_type or a front-matter tool nobody
    registered, ``tinyllm plugins``); call this to load them earlier, e.g. before listing
    :func:`client` names. Returns ``list[tinyllm.clients._plugins.Plugin]``: per entry point
    its name, value, distribution, version, ``loaded``, ``error`` and what it registered.
    A plugin that fails is named in a :class:`PluginWarning` and does not stop the others.
    """
    from .clients._plugins import load_plugins as _load

    return _load()


def get_embedding(text: str, model: str | None = None) -> list[float]:
    """Embed ``text`` with the current client (see :func:`get_client`); returns ``list[float]``.

    Raises: the errors of :meth:`Client.get_embeddings`.
    """
    return get_client().get_embedding(text, model)


def get_embeddings(texts: list[str], model: str | None = None) -> list[list[float]]:
    """Embed many texts in one batched request with the current client.

    Returns ``list[list[float]]`` in input order (cached texts are not sent again).
    Raises: the errors of :meth:`Client.get_embeddings` (BadRequestError for non-str input).
    """
    return get_client().get_embeddings(texts, model)

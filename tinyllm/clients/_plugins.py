"""Plugins: packages that add clients and tools through the entry-point group ``tinyllm.plugins``.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."tinyllm.plugins"]
    echo = "tinyllm_echo"            # a module, imported on first use

and its module registers what it adds with the public functions when it is imported
(``tinyllm.register_client("echo", EchoClient)``, ``@tinyllm.tool``). An entry point
may also name a function (``"tinyllm_echo:register"``): it is called with no arguments
after its module is imported.

Plugins are loaded once per process, on first use, never by ``import tinyllm``: when an
api_type nobody registered is asked for (``API_TYPE=echo``), when a front matter names
a tool nobody registered, when ``tinyllm plugins`` runs, or on :func:`load_plugins`.
A plugin that fails to load is named in a :class:`PluginWarning` (and a log line) and
the others load all the same. The entry points are read with :mod:`importlib.metadata`
(the same mechanism as simonw/llm's ``llm`` group and pytest's ``pytest11``).
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import TinyLLMError

__all__ = ["GROUP", "Plugin", "PluginWarning", "load_plugins", "loaded", "plugins", "registered_by_plugins"]

#: the entry-point group tinyllm reads
GROUP = "tinyllm.plugins"
log = logging.getLogger("tinyllm")


class PluginWarning(TinyLLMError, UserWarning):
    """A plugin failed to load (its import or its register function raised); the others still load.

    Issued with :func:`warnings.warn`, never raised by tinyllm (a TinyLLMError too, as every
    class tinyllm exports that derives from Exception).
    """


@dataclass
class Plugin:
    """One entry point of the ``tinyllm.plugins`` group and what loading it did.

    Attributes:
        name (str): the entry point's name.
        value (str): what it points at (``"module"`` or ``"module:function"``).
        distribution (str | None): the installed package that declares it, and ``version`` (str | None) its version.
        loaded (bool): it was imported (and its function called) without an error.
        error (str | None): ``"ExceptionType: message"`` when loading failed.
        clients (list[str]): the api_types it registered; ``tools`` (list[str]) the tool names.
    """

    name: str
    value: str
    distribution: str | None = None
    version: str | None = None
    loaded: bool = False
    error: str | None = None
    clients: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    _targets: dict = field(default_factory=dict, repr=False)  # api_type -> what it registered (object or class)

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {
            "name": self.name,
            "value": self.value,
            "distribution": self.distribution,
            "version": self.version,
            "loaded": self.loaded,
            "error": self.error,
            "clients": list(self.clients),
            "tools": list(self.tools),
        }


_lock = threading.RLock()  # re-entrant: a plugin's import may ask for a client, which asks for the plugins
_found: list[Plugin] | None = None


def loaded() -> bool:
    """Whether the plugins were loaded in this process already."""
    return _found is not None


def plugins() -> list[Plugin]:
    """The installed plugins and what loading them did (loads them first if need be); see :func:`load_plugins`."""
    return load_plugins()


def load_plugins() -> list[Plugin]:
    """Import every ``tinyllm.plugins`` entry point once per process; returns a :class:`Plugin` per entry point.

    Entry points load in name order. A second call returns the first call's records
    (nothing is imported again). A plugin whose import, or whose function, raises any
    ``Exception`` is reported with a :class:`PluginWarning` naming it and the error,
    and recorded with ``loaded=False``; the others load.
    """
    global _found
    if _found is not None:
        return list(_found)
    with _lock:
        if _found is not None:
            return list(_found)
        _found = []  # set first: a plugin that asks for a client while loading does not load the plugins again
        records = [_load(ep) for ep in sorted(_entry_points(), key=lambda e: (e.name, e.value))]
        _found.extend(records)
        return list(records)


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=GROUP))


def _load(ep: Any) -> Plugin:
    from ..tools import registry as tool_registry
    from . import default_registry

    dist = getattr(ep, "dist", None)
    record = Plugin(ep.name, ep.value, getattr(dist, "name", None), getattr(dist, "version", None))
    clients_before, tools_before = set(default_registry.registered()), set(tool_registry.names())
    try:
        target = ep.load()
        if getattr(ep, "attr", None):  # "module:function": call it
            if not callable(target):
                raise TypeError(f"{ep.value} is not callable")
            target()
    except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the others
        record.error = f"{type(exc).__name__}: {exc}"
        message = f"tinyllm plugin {ep.name!r} ({ep.value}) failed to load: {record.error}"
        log.warning("%s", message)
        warnings.warn(message, PluginWarning, stacklevel=3)
    else:
        record.loaded = True
    record.clients = sorted(set(default_registry.registered()) - clients_before)
    with default_registry._lock:
        record._targets = {
            name: default_registry._clients.get(name) or default_registry._classes.get(name) for name in record.clients
        }
    record.tools = sorted(set(tool_registry.names()) - tools_before)
    return record


def registered_by_plugins() -> dict[str, Any]:
    """``{api_type: client object or Client subclass}`` registered by the plugins while they loaded."""
    out: dict[str, Any] = {}
    for record in _found or ():
        out.update({k: v for k, v in record._targets.items() if v is not None})
    return out


def _reset_for_tests() -> None:
    """Forget the loaded records (modules stay imported); the next use reads the entry points again."""
    global _found
    with _lock:
        _found = None

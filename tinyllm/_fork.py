"""Fork safety: objects that hold per-process state (sockets, locks, counters) rebuild it in a forked child.

fork() (multiprocessing's default start method on Linux) copies the parent's
memory into the child: kept-alive sockets the parent still uses, locks that a
parent thread may hold (and that nobody in the child will ever release), request
slots held by parent threads that do not exist in the child. Each such object
registers one of its methods with :func:`reset_in_child`; the method runs in the
child right after ``os.fork()``, before any other code, while the child has one
thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable

__all__ = ["reset_in_child", "fresh_locks_in_child"]


def reset_in_child(method: Callable[[], None]) -> None:
    """Run the bound ``method`` in every child forked by ``os.fork()`` while its object lives.

    Only a weak reference is kept: a collected object's hook does nothing. No-op
    where there is no fork (Windows).
    """
    register = getattr(os, "register_at_fork", None)
    if register is None:
        return
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def hook() -> None:
        bound = ref()
        if bound is not None:
            bound()

    register(after_in_child=hook)


def fresh_locks_in_child(namespace: dict[str, Any], *names: str) -> None:
    """Give a forked child new, released module-level locks ``names`` of ``namespace`` (a module's ``globals()``).

    A lock some parent thread held at the moment of ``os.fork()`` stays held in the child,
    where that thread does not exist, so the child's first use would wait for ever. The
    module's functions read the global when they run, so they take the new lock. An
    ``RLock`` is replaced by an ``RLock``, anything else by a ``Lock``. No-op where there is no fork.
    """
    register = getattr(os, "register_at_fork", None)
    if register is None:
        return
    reentrant = type(threading.RLock())

    def hook() -> None:
        for name in names:
            namespace[name] = threading.RLock() if isinstance(namespace[name], reentrant) else threading.Lock()

    register(after_in_child=hook)

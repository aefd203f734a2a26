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
import weakref
from typing import Callable

__all__ = ["reset_in_child"]


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

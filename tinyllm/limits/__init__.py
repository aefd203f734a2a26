"""What holds a request back: the request queue (concurrency, ``QUEUE_SIZE``, ``QUEUE_TIMEOUT``),
client-side rate limits (RPM, TPM), cluster-wide leases in Redis, and USD budgets (``MAX_COST``).

:class:`RedisLimiter` is imported on first use (it needs the ``redis`` extra).
"""

from __future__ import annotations

from typing import Any

from ._budget import Budget
from ._queue import RequestQueue

__all__ = ["RequestQueue", "Budget", "RedisLimiter"]


def __getattr__(name: str) -> Any:
    if name == "RedisLimiter":
        from ._redis import RedisLimiter

        return RedisLimiter
    raise AttributeError(f"module 'tinyllm.limits' has no attribute {name!r}")

"""The reply cache: the protocol, the append-only pickle file, the in-memory cache and the Redis cache.

:class:`RedisCache` is imported on first use (it needs the ``redis`` extra).
"""

from __future__ import annotations

from typing import Any

from ._store import (
    Cache,
    MemoryCache,
    PickleCache,
    active_cache,
    cache_backend,
    cache_key,
    force_api_cache,
)

__all__ = [
    "Cache",
    "PickleCache",
    "MemoryCache",
    "RedisCache",
    "cache_key",
    "force_api_cache",
    "active_cache",
    "cache_backend",
]


def __getattr__(name: str) -> Any:
    if name == "RedisCache":
        from ._redis import RedisCache

        return RedisCache
    raise AttributeError(f"module 'tinyllm.cache' has no attribute {name!r}")

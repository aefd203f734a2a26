"""A reply cache in Redis, shared by every process and machine that sets the same ``REDIS_URL``.

Chosen by :func:`tinyllm.cache.active_cache` when ``CACHE_API_CALLS`` is on and
``CACHE_BACKEND`` is ``redis`` (or ``auto`` with ``REDIS_URL`` set).

Layout (``P`` = ``REDIS_PREFIX``, default ``tinyllm``; ``v1`` is the format version)::

    P:cache:v1:e:<cache key>    one string per entry: the value as JSON (SET, with EX when REDIS_CACHE_TTL > 0)
    P:cache:v1:stats            a hash {hits, misses}: every process's lookups, counted as they happen

Values travel as JSON, never pickle: a value read from Redis can never run code.
Only JSON data is stored (dict, list, str, int, float, bool, None; a tuple comes
back as a list). Lookups are one round trip (a Lua script does MGET and counts
the hits and misses); :meth:`RedisCache.get_many` looks up many keys in one.
:meth:`RedisCache.clear` deletes ``P:cache:v1:*`` with SCAN + UNLINK, never FLUSHDB.

Failures after the first use: a lookup that fails is logged and counts as a miss;
a write that fails raises OSError, which the client pipeline logs and the reply
is still returned.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any, Iterable, Mapping

from .._fork import fresh_locks_in_child
from ..config import Config, redact_url
from .._redis import connect, redis_errors, scan_match

__all__ = ["RedisCache", "FORMAT", "shared_redis_cache"]

log = logging.getLogger("tinyllm")

#: the format version in every cache key: a new value layout gets a new version, never a misread
FORMAT = "v1"

# KEYS[1] = stats hash, KEYS[2..] = entry keys -> the values (false when missing)
_GET_SCRIPT = """
local values = redis.call('MGET', unpack(KEYS, 2))
local hits = 0
for i = 1, #values do
  if values[i] then hits = hits + 1 end
end
if hits > 0 then redis.call('HINCRBY', KEYS[1], 'hits', hits) end
if #values > hits then redis.call('HINCRBY', KEYS[1], 'misses', #values - hits) end
return values
"""
_BATCH = 1000  # keys per script call / per SCAN page (Lua's unpack has a limit near 8000)


class RedisCache:
    """The :class:`~tinyllm.cache.Cache` interface over Redis: ``get``, ``get_many``, ``set``, ``update``, ``clear``, ``len``, ``stats``.

    Args:
        url: ``redis://[:password@]host:port/db`` (str); shown only with the password masked.
        prefix: the first part of every key (str, ``REDIS_PREFIX``).
        ttl: seconds an entry lives (float); 0 = no expiry.

    Thread-safe (redis-py's connection pool). Keys are ``str``.

    Raises:
        ConfigError: Redis cannot be reached when the cache is created (see :func:`tinyllm._redis.connect`).
    """

    def __init__(self, url: str, prefix: str = "tinyllm", ttl: float = 0.0) -> None:
        self.url = url
        self.namespace = f"{prefix}:cache:{FORMAT}:"
        self.ttl = ttl
        self._entry = self.namespace + "e:"
        self._stats_key = self.namespace + "stats"
        self._redis = connect(url)
        self._get = self._redis.register_script(_GET_SCRIPT)
        self._failing = False  # a failure was logged at WARNING; the next ones at DEBUG until one succeeds

    def __repr__(self) -> str:
        return f"<RedisCache {redact_url(self.url)} {self.namespace}*>"

    @property
    def path(self) -> str:
        """Where the entries are, for messages: the masked URL and the key pattern."""
        return f"{redact_url(self.url)} {self.namespace}*"

    # -- reads --------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, else ``default``; counts a hit or a miss in Redis.

        A failing Redis, or an entry that is not valid JSON (or nested too deep to read), is logged and
        gives ``default``. The shape of the value is the reader's to check (the client pipeline
        treats a value that is not a stored reply as a miss).
        """
        return self.get_many([key], default)[0]

    def get_many(self, keys: Iterable[str], default: Any = None) -> list[Any]:
        """The values under ``keys`` (in order, ``default`` where missing) in one round trip per 1,000 keys.

        Counts hits and misses like :meth:`get`; never raises for a failing Redis (logged, all misses).
        """
        keys = list(keys)
        out: list[Any] = []
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            try:
                raw = self._get(keys=[self._stats_key, *(self._entry + k for k in chunk)])
            except redis_errors() as exc:
                self._warn("reading from", exc, "%d lookup(s) count as misses", len(chunk))
                out.extend([default] * len(chunk))
                continue
            self._failing = False
            out.extend(default if value is None else self._decode(k, value, default) for k, value in zip(chunk, raw))
        return out

    def _decode(self, key: str, raw: bytes, default: Any) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested too deep to read
            log.warning(
                "Redis cache entry %s%s is not JSON that can be read (written by something else?); treated as a miss",
                self._entry,
                key,
            )
            return default

    def __contains__(self, key: object) -> bool:
        if type(key) is not str:
            return False
        try:
            return bool(self._redis.exists(self._entry + key))
        except redis_errors() as exc:
            self._warn("reading from", exc, "")
            return False

    # -- writes -------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON data) under ``key`` (str), replacing any previous value.

        Raises:
            TypeError: ``key`` is not a str, or ``value`` is not JSON data.
            OSError: Redis failed (the pipeline logs it and returns the reply anyway).
        """
        self.update({key: value})

    def update(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Store many entries in one round trip; return how many. Raises like :meth:`set`."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        encoded = []
        for key, value in pairs:
            if type(key) is not str:
                raise TypeError(f"cache keys must be str, got {type(key).__name__}")
            encoded.append((self._entry + key, _encode(value)))
        if not encoded:
            return 0
        ttl_ms = math.ceil(self.ttl * 1000) if self.ttl > 0 else None
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for name, data in encoded:
                    pipe.set(name, data, px=ttl_ms)
                pipe.execute()
        except redis_errors() as exc:
            raise OSError(
                f"Redis at {redact_url(self.url)} failed while writing the cache: {type(exc).__name__}: {exc}"
            ) from exc
        self._failing = False
        return len(encoded)

    def clear(self) -> int:
        """Remove every entry and the hit/miss counts (SCAN + UNLINK of this cache's keys only); return the keys removed.

        Raises:
            OSError: Redis failed.
        """
        removed = 0
        try:
            batch: list[bytes] = []
            for name in self._redis.scan_iter(match=scan_match(self.namespace), count=_BATCH):
                batch.append(name)
                if len(batch) >= _BATCH:
                    removed += self._redis.unlink(*batch)
                    batch = []
            if batch:
                removed += self._redis.unlink(*batch)
        except redis_errors() as exc:
            raise OSError(
                f"Redis at {redact_url(self.url)} failed while clearing the cache: {type(exc).__name__}: {exc}"
            ) from exc
        return removed

    # -- sizes --------------------------------------------------------------
    def _scan(self) -> tuple[int, int]:
        """(entries, bytes of their JSON values), by SCAN of the entry keys."""
        count = size = 0
        batch: list[bytes] = []

        def flush() -> int:
            with self._redis.pipeline(transaction=False) as pipe:
                for name in batch:
                    pipe.strlen(name)
                return sum(pipe.execute())

        for name in self._redis.scan_iter(match=scan_match(self._entry), count=_BATCH):
            batch.append(name)
            count += 1
            if len(batch) >= _BATCH:
                size += flush()
                batch = []
        if batch:
            size += flush()
        return count, size

    def __len__(self) -> int:
        try:
            return self._scan()[0]
        except redis_errors() as exc:
            raise OSError(f"Redis at {redact_url(self.url)} failed while counting the cache: {exc}") from exc

    def len(self) -> int:
        """Number of entries (``int``; a SCAN: O(entries)). Raises OSError when Redis fails."""
        return len(self)

    def stats(self) -> dict[str, Any]:
        """``{"entries", "size_bytes" (JSON values), "hits", "misses" (every process and machine), "path", "backend": "redis"}``.

        Raises:
            OSError: Redis failed.
        """
        try:
            entries, size = self._scan()
            counts = self._redis.hgetall(self._stats_key)
        except redis_errors() as exc:
            raise OSError(f"Redis at {redact_url(self.url)} failed while reading the cache stats: {exc}") from exc
        return {
            "entries": entries,
            "size_bytes": size,
            "hits": int(counts.get(b"hits", 0)),
            "misses": int(counts.get(b"misses", 0)),
            "path": self.path,
            "backend": "redis",
        }

    def _warn(self, doing: str, exc: BaseException, more: str, *args: Any) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "Redis at %s failed while %s the cache (%s: %s)" + ("; " + more if more else ""),
            redact_url(self.url),
            doing,
            type(exc).__name__,
            exc,
            *args,
        )


def _encode(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"))  # ASCII: a lone surrogate cannot break the write
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a Redis cache stores JSON data (dict, list, str, int, float, bool, None): {exc}") from None


_shared: dict[tuple[str, str, float], RedisCache] = {}
_shared_lock = threading.Lock()
fresh_locks_in_child(globals(), "_shared_lock")


def shared_redis_cache(cfg: Config) -> RedisCache:
    """The process's :class:`RedisCache` for ``cfg.redis_url``, ``cfg.redis_prefix`` and ``cfg.redis_cache_ttl``.

    Raises:
        ConfigError: REDIS_URL is unset, or Redis cannot be reached (first use).
    """
    if not cfg.redis_url:
        from ..errors import ConfigError

        raise ConfigError("CACHE_BACKEND=redis needs REDIS_URL (redis://host:6379/0)")
    ident = (cfg.redis_url, cfg.redis_prefix, cfg.redis_cache_ttl)
    cache = _shared.get(ident)
    if cache is None:
        with _shared_lock:
            cache = _shared.get(ident)
            if cache is None:
                cache = _shared[ident] = RedisCache(cfg.redis_url, cfg.redis_prefix, cfg.redis_cache_ttl)
    return cache

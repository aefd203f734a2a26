"""Cluster-wide request limits in Redis: concurrency by expiring leases, RPM/TPM by ``limits``' Redis storage.

Used by :class:`tinyllm.limits.RequestQueue` when ``LIMITS_BACKEND`` is ``redis`` (or
``auto`` with ``REDIS_URL`` set). Every process and machine that shares the URL,
``REDIS_PREFIX``, the endpoint and the API key (the *scope*, a hash: never the key
itself) shares the limits:

- **Concurrency** (``MAX_CONCURRENT_REQUESTS``): at most N HTTP attempts in flight.
  A slot is a lease: a member of the sorted set ``P:slots:<scope>`` scored by its
  expiry (Redis' clock), taken by one Lua script only while fewer than N unexpired
  leases exist, held for one HTTP attempt (not during a retry's wait) and removed at
  once when the attempt ends, with or without error. A process that dies holding a
  slot loses it after ``REDIS_SLOT_LEASE`` seconds (must exceed ``TIMEOUT``). A
  release pushes onto the list ``P:slots:<scope>:free``; waiters block on it with
  BLPOP, waking at the earliest lease expiry or after 1 s at most as a safety net
  (no busy polling). Waiters of different processes are served in no set order.
- **Rates** (``REQUESTS_PER_MINUTE``, ``TOKENS_PER_MINUTE``): the ``limits`` package's
  ``RedisStorage`` under ``P:rates:``, with the in-process queue's windows (moving
  windows of RPM per minute and ceil(RPM/60) per second, a sliding window counter of
  TPM per minute). Each limit is consumed with the storage's atomic hit (one Lua
  script); when a later limit of the same request is full, the earlier hits stay
  spent and the request waits, testing every limit before it hits again: a race
  can cost capacity, never exceed it.
  Rate limits are checked once per HTTP attempt, while holding its slot.

``QUEUE_TIMEOUT`` bounds the wait for a slot and the rates of each attempt;
``QUEUE_SIZE`` bounds the attempts waiting in this process (per client object).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from ..config import Config, redact_url
from ..errors import BadRequestError, ConfigError, QueueFullError
from .._redis import connect, failure, redis_errors
from ._window import time_to_room

__all__ = ["RedisLimiter", "scope_id"]

log = logging.getLogger("tinyllm")

#: seconds a waiter blocks at most before it looks again (a lost notification costs no more)
SAFETY_WAIT = 1.0

# KEYS[1] = leases (zset member -> expiry ms); ARGV = limit, token, lease ms.
# -> -1 when the slot is taken, else ms until the earliest lease expires.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
  return -1
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(tonumber(first[2]) - now, 0)
"""
# KEYS[1] = leases, KEYS[2] = notify list; ARGV = token, limit, lease ms.
# -> 1 when the lease was still held (a waiter is woken), 0 when it had expired.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, math.max(tonumber(ARGV[2]) - 1, 0))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""


def scope_id(endpoint: dict, api_key: str | None) -> str:
    """Who shares the limits: a sha256 hex (32 chars) of the endpoint identity and of a hash of ``api_key``."""
    key_hash = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest() if api_key else ""
    doc = json.dumps({"endpoint": endpoint, "key": key_hash}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisLimiter:
    """The cluster-wide slot and rate limits of one request queue (see the module docstring).

    Args:
        url: the Redis URL (str).
        prefix: ``REDIS_PREFIX`` (str).
        name: the queue's name, for messages.

    Raises:
        ConfigError: Redis cannot be reached (first use in this process).
    """

    def __init__(self, url: str, prefix: str, name: str = "") -> None:
        self.url, self.prefix, self.name = url, prefix, name
        self._redis = connect(url)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._lock = threading.Lock()
        self._waiting = 0
        self._rates: Any = None  # (moving, sliding) limiters over limits' RedisStorage, on first use
        self._pools: tuple[concurrent.futures.ThreadPoolExecutor, concurrent.futures.ThreadPoolExecutor] | None = None
        self._pools_pid = 0

    def __repr__(self) -> str:
        return f"<RedisLimiter {redact_url(self.url)} prefix={self.prefix!r} queue={self.name!r}>"

    @property
    def waiting(self) -> int:
        """Attempts of this process waiting for a cluster-wide slot now."""
        return self._waiting

    def in_flight(self, scope: str) -> int:
        """Unexpired leases of ``scope`` held now, by every process (one Redis round trip)."""
        now = self._redis.time()
        return int(self._redis.zcount(self._slots(scope), now[0] * 1000 + now[1] // 1000 + 1, "+inf"))

    # -- the lease of one HTTP attempt ---------------------------------------
    @contextlib.contextmanager
    def lease(self, cfg: Config, tokens: int, scope: str) -> Iterator[None]:
        """Hold a cluster-wide slot, and pass the rate limits, for the ``with`` body (one HTTP attempt).

        Args:
            cfg: the request's settings (``max_concurrent_requests``, ``queue_size``,
                ``queue_timeout``, ``requests_per_minute``, ``tokens_per_minute``,
                ``redis_slot_lease``, ``timeout``).
            tokens: tokens counted against TOKENS_PER_MINUTE.
            scope: :func:`scope_id` of the endpoint and key.

        Raises:
            QueueFullError: QUEUE_SIZE attempts of this process already wait, or the
                slot and the rates take longer than QUEUE_TIMEOUT (nothing was sent).
            BadRequestError: ``tokens`` alone exceeds TOKENS_PER_MINUTE.
            ConfigError: REDIS_SLOT_LEASE is not above TIMEOUT.
            APIConnectionError: Redis failed (the limits cannot be checked: nothing is sent).
        """
        token = self._enter(cfg, tokens, scope)
        try:
            yield
        finally:
            self._exit(cfg, scope, token)

    @contextlib.asynccontextmanager
    async def alease(self, cfg: Config, tokens: int, scope: str) -> AsyncIterator[None]:
        """The asyncio twin of :meth:`lease` (same arguments and errors); never blocks the event loop.

        The wait runs in a thread of this limiter's own pool; cancelling the task
        while it waits gives back a slot the thread takes after all.
        """
        waits, releases = self._executors()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(waits, self._enter, cfg, tokens, scope)
        try:
            token = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: f.cancelled() or f.exception() or releases.submit(self._exit, cfg, scope, f.result())
            )
            raise
        try:
            yield
        finally:
            await loop.run_in_executor(releases, self._exit, cfg, scope, token)

    def _executors(self) -> tuple[concurrent.futures.ThreadPoolExecutor, concurrent.futures.ThreadPoolExecutor]:
        with self._lock:
            if self._pools is None or self._pools_pid != os.getpid():  # (a forked child has none of their threads)
                self._pools_pid = os.getpid()  # separate pools: a release never queues behind blocked waiters
                self._pools = (
                    concurrent.futures.ThreadPoolExecutor(256, thread_name_prefix="tinyllm-redis-wait"),
                    concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tinyllm-redis-release"),
                )
            return self._pools

    def _enter(self, cfg: Config, tokens: int, scope: str) -> str:
        """Take a slot, then pass the rates while holding it; return the lease's token."""
        if cfg.tokens_per_minute and tokens > cfg.tokens_per_minute:
            raise BadRequestError(
                f"the request needs {tokens} tokens (prompt + max_tokens) but TOKENS_PER_MINUTE is "
                f"{cfg.tokens_per_minute}; lower max_tokens, shorten the input or raise TOKENS_PER_MINUTE"
            )
        if cfg.redis_slot_lease <= cfg.timeout:
            raise ConfigError(
                f"REDIS_SLOT_LEASE ({cfg.redis_slot_lease:g} s) must be longer than TIMEOUT "
                f"({cfg.timeout:g} s): a slot must outlive the attempt that holds it"
            )
        deadline = time.monotonic() + cfg.queue_timeout if cfg.queue_timeout else None
        token = self._take_slot(cfg, scope, deadline)
        try:
            self._pass_rates(cfg, tokens, scope, deadline)
        except BaseException:
            self._exit(cfg, scope, token)
            raise
        return token

    def _exit(self, cfg: Config, scope: str, token: str) -> None:
        """Give the slot back now and wake one waiter; a failure is logged (the lease expires anyway)."""
        lease_ms = math.ceil(cfg.redis_slot_lease * 1000)
        try:
            held = self._release(
                keys=[self._slots(scope), self._slots(scope) + ":free"],
                args=[token, cfg.max_concurrent_requests, lease_ms],
            )
        except redis_errors() as exc:
            log.warning(
                "could not give back a request slot to Redis at %s (%s: %s); it frees itself "
                "after REDIS_SLOT_LEASE=%g s",
                redact_url(self.url),
                type(exc).__name__,
                exc,
                cfg.redis_slot_lease,
            )
            return
        if not held:
            log.warning(
                "a request held its cluster-wide slot longer than REDIS_SLOT_LEASE=%g s, so another request "
                "may have been sent meanwhile; raise REDIS_SLOT_LEASE above TIMEOUT",
                cfg.redis_slot_lease,
            )

    def _slots(self, scope: str) -> str:
        return f"{self.prefix}:slots:{scope}"

    # -- the slot -------------------------------------------------------------
    def _take_slot(self, cfg: Config, scope: str, deadline: float | None) -> str:
        with self._lock:
            if self._waiting >= cfg.queue_size:
                raise QueueFullError(
                    f"request queue {self.name!r} is full: {self._waiting} requests of this process already "
                    f"waiting for a cluster-wide slot (QUEUE_SIZE={cfg.queue_size}); the request was not sent"
                )
            self._waiting += 1
        token = uuid.uuid4().hex
        keys = [self._slots(scope)]
        args = [cfg.max_concurrent_requests, token, math.ceil(cfg.redis_slot_lease * 1000)]
        try:
            while True:
                try:
                    free_in = self._acquire(keys=keys, args=args)
                    if free_in < 0:
                        return token
                    left = _remaining(deadline)
                    if left is not None and left <= 0:
                        raise QueueFullError(
                            f"request waited more than QUEUE_TIMEOUT={cfg.queue_timeout:g} s for one of the "
                            f"MAX_CONCURRENT_REQUESTS={cfg.max_concurrent_requests} cluster-wide slots of queue "
                            f"{self.name!r} (Redis at {redact_url(self.url)}); the request was not sent"
                        )
                    wait = min(SAFETY_WAIT, free_in / 1000 + 0.001, left if left is not None else SAFETY_WAIT)
                    self._redis.blpop([keys[0] + ":free"], timeout=max(wait, 0.01))
                except redis_errors() as exc:
                    raise failure(self.url, exc, "waiting for a request slot") from exc
        finally:
            with self._lock:
                self._waiting -= 1

    # -- the rates ------------------------------------------------------------
    def _limiters(self) -> tuple[Any, Any]:
        with self._lock:
            if self._rates is None:
                from limits.storage import RedisStorage
                from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

                storage = RedisStorage(
                    self.url, connection_pool=self._redis.connection_pool, key_prefix=f"{self.prefix}:rates"
                )
                self._rates = (MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage))
            return self._rates

    def _pass_rates(self, cfg: Config, tokens: int, scope: str, deadline: float | None) -> None:
        """Consume this attempt's share of RPM and TPM, sleeping until there is room."""
        rpm, tpm = cfg.requests_per_minute, cfg.tokens_per_minute
        if not rpm and not (tpm and tokens > 0):
            return
        from limits import RateLimitItemPerMinute as PerMinute, RateLimitItemPerSecond as PerSecond

        namespace = f"tinyllm/{scope}"
        moving, sliding = self._limiters()
        checks = []  # the shortest window first: a lost race there wastes the least
        if rpm:
            checks += [
                (moving, PerSecond(math.ceil(rpm / 60), namespace=namespace), 1),
                (moving, PerMinute(rpm, namespace=namespace), 1),
            ]
        if tpm and tokens > 0:
            checks.append((sliding, PerMinute(tpm, namespace=namespace), tokens))
        try:  # optimistic: while there is room, one atomic hit per limit and nothing else
            if all(limiter.hit(item, cost=n) for limiter, item, n in checks):
                return
        except redis_errors() as exc:
            raise failure(self.url, exc, "checking the rate limits") from exc
        while True:  # near a limit: look first, so that lost races waste little
            try:
                wait = max(time_to_room(limiter, item, n, limiter is sliding) for limiter, item, n in checks)
                if wait <= 0:
                    if all(limiter.hit(item, cost=n) for limiter, item, n in checks):
                        return
                    wait = random.uniform(0.001, 0.005)  # another process took the room first: look again
            except redis_errors() as exc:
                raise failure(self.url, exc, "checking the rate limits") from exc
            left = _remaining(deadline)
            if left is not None and wait > left:
                raise QueueFullError(
                    f"the rate limits (REQUESTS_PER_MINUTE={rpm}, TOKENS_PER_MINUTE={tpm}, cluster-wide) need a "
                    f"wait of {wait:.1f} s, more than the {left:.1f} s left of QUEUE_TIMEOUT="
                    f"{cfg.queue_timeout:g} s in queue {self.name!r}; the request was not sent"
                )
            time.sleep(wait)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)

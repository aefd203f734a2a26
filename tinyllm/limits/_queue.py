"""Request queue (concurrency, capacity, timeout) and client-side rate limits.

One :class:`RequestQueue` per client object. A request first takes a slot (at most
MAX_CONCURRENT_REQUESTS in flight, at most QUEUE_SIZE waiting, first come first
served), then waits for REQUESTS_PER_MINUTE and TOKENS_PER_MINUTE (0 = off), all
within QUEUE_TIMEOUT seconds (0 = no bound). Settings come from the Config given
to each acquire. Threads and asyncio share one FIFO line: a thread waits on a
``threading.Event``, a coroutine on a Future of its loop; a freed slot is handed
straight to the head of the line.

Rate limits count in the ``limits`` package's memory storage (non-blocking
test/hit; the sleeping is done here). Requests: moving windows of RPM per minute
and ceil(RPM / 60) per second, as servers enforce per-minute limits over shorter
periods. Tokens: a sliding window counter of TPM per minute (O(1) memory).

With ``REDIS_URL`` set (``LIMITS_BACKEND``) the limits are cluster-wide instead:
:meth:`RequestQueue.lease` around each HTTP attempt (tinyllm/limits/_redis.py),
and :meth:`RequestQueue.slot` does nothing.

After ``os.fork()`` the child starts with an empty queue of its own (no slots
held, nobody waiting, fresh locks and rate windows): the parent's requests are
not the child's. The in-process limits therefore apply per process.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

if TYPE_CHECKING:
    import asyncio

from .._fork import reset_in_child
from ..errors import BadRequestError, ConfigError, QueueFullError
from ._window import time_to_room

__all__ = ["RequestQueue"]


class _Waiter:
    """One request in line: a threading.Event (loop is None) or a Future of ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future = loop.create_future() if loop is not None else None
        self.granted = False  # set under the queue lock when a slot is handed over


def _wake(future: asyncio.Future) -> None:
    if not future.done():  # it may have been cancelled or timed out meanwhile
        future.set_result(None)


class RequestQueue:
    """A FIFO request queue with a concurrency limit, plus client-side rate limits.

    ``name`` (str) is shown in error messages. Use ``with queue.slot(cfg, tokens): ...``
    in threads and ``async with queue.aslot(cfg, tokens): ...`` in asyncio.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._limit = 1  # MAX_CONCURRENT_REQUESTS of the latest request
        self._fresh_state()
        reset_in_child(self._fresh_state)

    def _fresh_state(self) -> None:
        """An empty line, no slot held, new locks and rate windows (at start, and in a forked child,
        where the parent's slots, waiters, possibly held locks and the limiter's timer thread are not its own)."""
        self._lock = threading.RLock()  # reentrant: a dropped stream's finalizer may release while this thread holds it
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        self._rate_lock = threading.Lock()
        self._rates: Any = None  # (moving, sliding) limiters, created on first use
        self._cluster_limiter = None  # the Redis limiter (its lock and connections) is made anew on first use

    @property
    def in_flight(self) -> int:
        """Requests holding a slot now (sending, or waiting for the rate limits)."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting in line for a slot now."""
        return len(self._waiters)

    @contextlib.contextmanager
    def slot(self, cfg: Any, tokens: int = 0) -> Iterator[None]:
        """Block until this request may be sent; hold its slot for the ``with`` body.

        Args:
            cfg (tinyllm.config.Config): settings read now: ``max_concurrent_requests``,
                ``queue_size``, ``queue_timeout`` (seconds, 0 = no bound),
                ``requests_per_minute`` and ``tokens_per_minute`` (0 = off).
            tokens (int): tokens this request counts against
                TOKENS_PER_MINUTE (prompt tokens + max_tokens).

        Raises:
            QueueFullError: QUEUE_SIZE requests are already waiting, or the wait
                for a slot and the rate limits exceeds QUEUE_TIMEOUT seconds.
                The request was not sent and never will be.
            BadRequestError: ``tokens`` alone exceeds TOKENS_PER_MINUTE (nothing is sent).
        """
        release = self.acquire(cfg, tokens)
        try:
            yield
        finally:
            release()

    @contextlib.asynccontextmanager
    async def aslot(self, cfg: Any, tokens: int = 0) -> AsyncIterator[None]:
        """Await until this request may be sent; hold its slot for the ``async with`` body.

        The asyncio twin of :meth:`slot` (same arguments, same errors); it never
        blocks the event loop. Cancelling the task, while it waits or while it
        holds the slot, gives the slot back.
        """
        release = await self.aacquire(cfg, tokens)
        try:
            yield
        finally:
            release()

    def acquire(self, cfg: Any, tokens: int = 0) -> Callable[[], None]:
        """Block until this request may be sent and take its slot; returns ``release()``, which gives
        the slot back (safe to call more than once, from any thread, without awaiting: a stream
        dropped unfinished frees its slot from a finalizer). Arguments and errors as :meth:`slot`."""
        if self._cluster(cfg) is not None:  # cluster-wide limits: lease() around each HTTP attempt does it all
            return _no_release
        deadline, waiter = self._begin(cfg, tokens, None)
        if waiter is not None:
            try:
                got = waiter.event.wait(_remaining(deadline))  # type: ignore[union-attr]  # a thread's waiter has an event
            except BaseException:  # KeyboardInterrupt while waiting
                if self._leave_line(waiter):
                    self._release()
                raise
            if not got and not self._leave_line(waiter):  # granted in the race: keep it
                raise self._timeout_error(cfg)
        try:
            while (wait := self._rate_wait(cfg, tokens, deadline)) > 0:
                time.sleep(wait)
        except BaseException:
            self._release()
            raise
        return _Release(self._release)

    async def aacquire(self, cfg: Any, tokens: int = 0) -> Callable[[], None]:
        """The asyncio twin of :meth:`acquire`: awaits its turn; returns the same kind of ``release()``."""
        import asyncio  # here, not at the top: `import tinyllm` does not import asyncio

        if self._cluster(cfg) is not None:  # cluster-wide limits: alease() around each HTTP attempt does it all
            return _no_release
        deadline, waiter = self._begin(cfg, tokens, asyncio.get_running_loop())
        if waiter is not None:
            try:
                await asyncio.wait_for(waiter.future, _remaining(deadline))  # type: ignore[arg-type]  # a task's waiter has a future
            except asyncio.TimeoutError:
                if not self._leave_line(waiter):
                    raise self._timeout_error(cfg) from None
            except BaseException:  # CancelledError while waiting
                if self._leave_line(waiter):
                    self._release()
                raise
        try:
            while (wait := self._rate_wait(cfg, tokens, deadline)) > 0:
                await asyncio.sleep(wait)
        except BaseException:
            self._release()
            raise
        return _Release(self._release)

    # -- the line -----------------------------------------------------------

    def _begin(self, cfg: Any, tokens: int, loop: Any) -> tuple[float | None, _Waiter | None]:
        """Check the tokens against TOKENS_PER_MINUTE; take a free slot (waiter None) or join the end of the line."""
        if cfg.tokens_per_minute and tokens > cfg.tokens_per_minute:
            raise BadRequestError(  # this request's fault, not the settings': the next one may fit
                f"the request needs {tokens} tokens (prompt + max_tokens) but TOKENS_PER_MINUTE is "
                f"{cfg.tokens_per_minute}; lower max_tokens, shorten the input or raise TOKENS_PER_MINUTE"
            )
        deadline = time.monotonic() + cfg.queue_timeout if cfg.queue_timeout else None
        with self._lock:
            self._limit = cfg.max_concurrent_requests
            self._dispatch()  # the limit may have grown
            if not self._waiters and self._in_flight < self._limit:
                self._in_flight += 1
                return deadline, None
            if len(self._waiters) >= cfg.queue_size:
                raise QueueFullError(
                    f"request queue {self.name!r} is full: {len(self._waiters)} requests "
                    f"already waiting (QUEUE_SIZE={cfg.queue_size}), {self._in_flight} in flight "
                    f"(MAX_CONCURRENT_REQUESTS={cfg.max_concurrent_requests}); the request was not sent"
                )
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
            return deadline, waiter

    def _dispatch(self) -> None:
        """Hand free slots to the head of the line. Caller holds ``self._lock``."""
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if waiter.loop is None:
                waiter.event.set()  # type: ignore[union-attr]  # a thread's waiter has an event
            else:
                try:
                    waiter.loop.call_soon_threadsafe(_wake, waiter.future)  # type: ignore[arg-type]
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    continue
            waiter.granted = True
            self._in_flight += 1

    def _leave_line(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of the line; True if a slot was handed to it meanwhile."""
        with self._lock:
            if waiter.granted:
                return True
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            return False

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._dispatch()

    def _timeout_error(self, cfg: Any) -> QueueFullError:
        return QueueFullError(
            f"request waited more than QUEUE_TIMEOUT={cfg.queue_timeout:g} s in queue {self.name!r} "
            f"({self._in_flight} in flight, MAX_CONCURRENT_REQUESTS={cfg.max_concurrent_requests}; "
            f"{len(self._waiters)} waiting); the request was not sent"
        )

    # -- rate limits --------------------------------------------------------

    def _limiters(self) -> tuple[Any, Any]:
        """(moving window, sliding window counter) limiters on one memory storage; caller holds ``_rate_lock``."""
        if self._rates is None:  # imported and started (a timer thread) only when needed
            from limits.storage import MemoryStorage
            from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

            storage = MemoryStorage()
            self._rates = (MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage))
        return self._rates

    def count_tokens(self, cfg: Any, tokens: int) -> None:
        """Count ``tokens`` (int) more against TOKENS_PER_MINUTE without waiting: the completion
        tokens of a streamed reply whose request reserved none (no ``max_tokens``), known only
        at its end. With cluster-wide limits (Redis) nothing is counted here."""
        if not cfg.tokens_per_minute or tokens <= 0 or self._cluster(cfg) is not None:
            return
        from limits import RateLimitItemPerMinute as PerMinute

        with self._rate_lock:
            self._limiters()[1].hit(PerMinute(cfg.tokens_per_minute), cost=tokens)

    def _rate_wait(self, cfg: Any, tokens: int, deadline: float | None) -> float:
        """Use up this request's allowance and return 0, or return seconds to wait first.

        Raises QueueFullError if that wait would pass the deadline (time.monotonic()).
        """
        rpm, tpm = cfg.requests_per_minute, cfg.tokens_per_minute
        if not rpm and not (tpm and tokens > 0):
            return 0.0
        from limits import RateLimitItemPerMinute as PerMinute, RateLimitItemPerSecond as PerSecond

        with self._rate_lock:
            moving, sliding = self._limiters()
            checks = []
            if rpm:
                checks += [(moving, PerMinute(rpm), 1), (moving, PerSecond(math.ceil(rpm / 60)), 1)]
            if tpm and tokens > 0:
                checks.append((sliding, PerMinute(tpm), tokens))
            wait = max(time_to_room(limiter, item, n, limiter is sliding) for limiter, item, n in checks)
            if wait <= 0:
                for limiter, item, n in checks:
                    limiter.hit(item, cost=n)
                return 0.0
        left = _remaining(deadline)
        if left is not None and wait > left:
            raise QueueFullError(
                f"the rate limits (REQUESTS_PER_MINUTE={rpm}, TOKENS_PER_MINUTE={tpm}) need a "
                f"wait of {wait:.1f} s, more than the {left:.1f} s left of QUEUE_TIMEOUT="
                f"{cfg.queue_timeout:g} s in queue {self.name!r}; the request was not sent"
            )
        return wait

    # -- cluster-wide limits through Redis (REDIS_URL; tinyllm/limits/_redis.py) --

    _cluster_limiter: Any = None  # a RedisLimiter, made on first use

    def _cluster(self, cfg: Any) -> Any:
        """The :class:`~tinyllm.limits.RedisLimiter` when ``cfg`` shares the limits through
        Redis (``LIMITS_BACKEND=redis``, or ``auto`` with ``REDIS_URL`` set), else None.

        Raises:
            ConfigError: LIMITS_BACKEND=redis without REDIS_URL; Redis cannot be reached (first use).
        """
        if cfg.limits_backend == "local" or not (cfg.redis_url or cfg.limits_backend == "redis"):
            return None
        if not cfg.redis_url:
            raise ConfigError("LIMITS_BACKEND=redis needs REDIS_URL (redis://host:6379/0)")
        limiter = self._cluster_limiter
        if limiter is None or (limiter.url, limiter.prefix) != (cfg.redis_url, cfg.redis_prefix):
            from ._redis import RedisLimiter

            limiter = self._cluster_limiter = RedisLimiter(cfg.redis_url, cfg.redis_prefix, self.name)
        return limiter

    def cluster_wide(self, cfg: Any) -> bool:
        """Whether ``cfg`` shares the limits through Redis, so that :meth:`lease` does the work.

        Raises:
            ConfigError: as :meth:`_cluster`.
        """
        return self._cluster(cfg) is not None

    def lease(self, cfg: Any, tokens: int = 0, scope: Callable[[], str] = str) -> Any:
        """A context manager around ONE HTTP attempt: with cluster-wide limits, it holds a slot and
        passes the rate limits for that attempt only (see :meth:`RedisLimiter.lease`); else it does nothing
        (:meth:`slot` around the whole retry loop does the work).

        ``scope()`` (str) names who shares the limits (:func:`tinyllm.limits._redis.scope_id`); it is
        called only with cluster-wide limits. Errors: as :meth:`RedisLimiter.lease`.
        """
        limiter = self._cluster(cfg)
        return _NO_LEASE if limiter is None else limiter.lease(cfg, tokens, scope())

    def alease(self, cfg: Any, tokens: int = 0, scope: Callable[[], str] = str) -> Any:
        """The asyncio twin of :meth:`lease`: use with ``async with``."""
        limiter = self._cluster(cfg)
        return _NO_LEASE if limiter is None else limiter.alease(cfg, tokens, scope())


_NO_LEASE = contextlib.nullcontext()  # reusable, and an async context manager too


def _no_release() -> None:
    """The release of a slot never taken here (cluster-wide limits hold theirs per attempt)."""


class _Release:
    """Gives one slot back on the first call; later calls do nothing (list.pop is atomic, no lock:
    it may run from a finalizer while this thread holds the queue's lock elsewhere)."""

    __slots__ = ("_once",)

    def __init__(self, release: Callable[[], None]) -> None:
        self._once = [release]

    def __call__(self) -> None:
        try:
            release = self._once.pop()
        except IndexError:
            return
        release()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)

"""Budgets in USD: ``MAX_COST`` for the process, a :class:`Budget` for a run (``tinyllm map --max-cost``).

Before a request is sent (after the cache missed and the prompt was counted),
its cost is estimated and reserved: the prompt tokens plus ``max_tokens`` (when
unset: the completion tokens of the longest reply of the model seen in this process,
:data:`RESERVED_OUTPUT` before the first; never more than the rest of the context window) at the
model's prices (:mod:`tinyllm.observe._pricing`), all input counted as uncached.

- If what was spent plus this estimate is more than the budget, the call is refused
  with :class:`~tinyllm.errors.BudgetExceededError` and nothing is sent.
- If it fits but not beside the reservations of the calls in flight, the call waits
  (up to ``QUEUE_TIMEOUT`` seconds; 0: as long as it takes) for them to be answered,
  then checks again: it goes on if the budget still has room, else it is refused.
- Otherwise the estimate is held while the call runs and replaced by the real cost
  when it is answered (a failed call costs nothing).

With ``max_tokens`` set the budget is a hard limit. Without it a reply may be longer
than its reservation, so the spending can pass the limit by that excess of the calls
in flight (set ``max_tokens`` when the limit must hold to the cent).

The process's ``MAX_COST`` counts the cost in :func:`tinyllm.usage_stats`
(:func:`tinyllm.reset_usage_stats` starts it over); a :class:`Budget` counts the
replies of the calls made while it is active.

A model without a price cannot be held to a budget: its calls go through, with
one WARNING per model.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

from ..observe import _pricing as pricing
from ..observe import _usage as usage
from ..errors import BudgetExceededError

__all__ = [
    "Budget",
    "hold",
    "ahold",
    "reserve",
    "areserve",
    "charge",
    "process_budget",
    "RESERVED_OUTPUT",
    "DEFAULT_WORST_OUTPUT",
]

log = logging.getLogger("tinyllm")
#: output tokens reserved for a call without max_tokens (unless a longer reply of the model was seen)
RESERVED_OUTPUT = 1024
DEFAULT_WORST_OUTPUT = RESERVED_OUTPUT  # the former name
_POLL = 0.02  # seconds between looks of an asyncio call waiting for the calls in flight


class Budget:
    """A spending limit in USD, safe to share between threads.

    Args:
        limit: USD (float >= 0), or None for no limit (the process budget: its
            limit is the ``MAX_COST`` setting of each call).

    Attributes:
        spent (float): USD of the replies answered under this budget.
        in_flight (float): USD reserved by the calls under way (see the module docstring for how much).

    Use :meth:`activate` (a context manager) to put calls under it; calls under
    several budgets (the process's and a run's) must fit all of them.
    """

    def __init__(self, limit: float | None = None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0):
            from ..errors import ConfigError

            raise ConfigError(f"a budget must be a number of USD >= 0, got {limit!r}")
        self.limit = None if limit is None else float(limit)
        self.spent = 0.0
        self.in_flight = 0.0
        self.refused = 0
        self._new_lock()

    def _new_lock(self) -> None:
        # reentrant: a dropped stream's finalizer may settle while this thread holds it
        self._lock = threading.RLock()
        self._freed = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"Budget(limit={self.limit!r}, spent={self.spent:.6f}, in_flight={self.in_flight:.6f})"

    @property
    def remaining(self) -> float | None:
        """USD left (never below 0), or None without a limit."""
        return None if self.limit is None else max(0.0, self.limit - self.spent)

    def reserve(self, estimate: float, model: str, limit: float | None = None, wait: float | None = 0.0) -> None:
        """Hold ``estimate`` USD for a call to ``model``; ``limit`` overrides :attr:`limit` for this check.

        Args:
            wait: seconds to wait for calls in flight to be answered when their reservations are
                all that keeps this one out (0: refuse at once; None: as long as it takes).

        Raises:
            BudgetExceededError: spent + estimate exceeds the limit; or spent + in flight + estimate
                still does after ``wait`` seconds.
        """
        limit = self.limit if limit is None else limit
        deadline = None if wait is None else time.monotonic() + wait
        with self._freed:
            while not self._try_reserve(estimate, model, limit, final=False):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._try_reserve(estimate, model, limit, final=True)  # raises
                self._freed.wait(left)

    async def areserve(self, estimate: float, model: str, limit: float | None = None, wait: float | None = 0.0) -> None:
        """The asyncio twin of :meth:`reserve`: waits without blocking the event loop."""
        import asyncio

        limit = self.limit if limit is None else limit
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            with self._lock:
                if self._try_reserve(
                    estimate, model, limit, final=deadline is not None and time.monotonic() >= deadline
                ):
                    return
            await asyncio.sleep(_POLL)

    def _try_reserve(self, estimate: float, model: str, limit: float | None, final: bool) -> bool:
        """Reserve and return True; False when only the calls in flight are in the way (unless ``final``);
        BudgetExceededError when it cannot fit. Caller holds the lock."""
        if limit is None:
            self.in_flight += estimate
            return True
        fits_alone = self.spent + estimate <= limit + 1e-12
        if fits_alone and self.spent + self.in_flight + estimate <= limit + 1e-12:
            self.in_flight += estimate
            return True
        if fits_alone and self.in_flight > 0 and not final:
            return False
        self.refused += 1
        usd = pricing.usd
        raise BudgetExceededError(
            f"the budget of {usd(limit)} could be exceeded: spent {usd(self.spent)}, in flight up to "
            f"{usd(self.in_flight)}, and this call to {model} could cost up to {usd(estimate)}; "
            "nothing was sent",
            limit=limit,
            spent=self.spent,
            in_flight=self.in_flight,
            estimate=estimate,
            model=model,
        )

    def settle(self, estimate: float, cost: float | None) -> None:
        """Release a held ``estimate`` and add the real ``cost`` (None: nothing known to add); wakes waiting calls."""
        with self._freed:
            self.in_flight = max(0.0, self.in_flight - estimate)
            if cost:
                self.spent += cost
            self._freed.notify_all()

    def spend(self, cost: float | None) -> None:
        """Add ``cost`` USD (None or 0: nothing)."""
        if cost:
            with self._freed:
                self.spent += cost
                self._freed.notify_all()

    @contextlib.contextmanager
    def activate(self, *, all_threads: bool = False) -> Iterator["Budget"]:
        """Put calls under this budget while the block runs.

        Args:
            all_threads: False (default): the calls of this thread or asyncio task, and of what it
                starts with a copy of its context: :meth:`tinyllm.LLMCall.map`, ``tinyllm map``,
                the tool threads of a call, asyncio tasks, and your own threads when you start
                them with ``contextvars.copy_context().run``. True: the calls of every thread of
                the process (a thread pool of your own, a web server's threads).
        """
        global _everywhere
        if all_threads:
            with _everywhere_lock:
                _everywhere = (*_everywhere, self)
        token = _active.set((*_active.get(), self))
        try:
            yield self
        finally:
            _active.reset(token)
            if all_threads:
                with _everywhere_lock:
                    kept = list(_everywhere)
                    kept.remove(self)
                    _everywhere = tuple(kept)

    def _after_fork(self) -> None:
        self._new_lock()
        self.spent = self.in_flight = 0.0
        self.refused = 0


class _ProcessBudget(Budget):
    """The process's budget: its limit is each call's ``MAX_COST``; what it has spent is the cost in
    :func:`tinyllm.usage_stats` (so :func:`tinyllm.reset_usage_stats` starts it over)."""

    @property  # type: ignore[override]
    def spent(self) -> float:
        return usage.total_cost()

    @spent.setter
    def spent(self, value: float) -> None:
        pass  # the usage counters hold it

    def _after_fork(self) -> None:
        self._new_lock()
        self.in_flight = 0.0
        self.refused = 0


_process = _ProcessBudget()
_active: contextvars.ContextVar[tuple[Budget, ...]] = contextvars.ContextVar("tinyllm_budgets", default=())
_everywhere: tuple[Budget, ...] = ()  # budgets activated with all_threads=True
_everywhere_lock = threading.Lock()
_warned: set[str] = set()
if hasattr(os, "register_at_fork"):  # no call of the parent is in flight in a child
    os.register_at_fork(after_in_child=_process._after_fork)


def process_budget() -> Budget:
    """The process-wide budget: its ``spent`` is :func:`tinyllm.usage_stats`'s ``cost`` (every priced reply since
    start or :func:`tinyllm.reset_usage_stats`); its limit is ``MAX_COST``."""
    return _process


def _active_budgets() -> tuple[Budget, ...]:
    """The budgets in force for a call in this context: this context's, then the all-threads ones."""
    active = _active.get()
    if _everywhere:
        active = (*active, *(b for b in _everywhere if b not in active))
    return active


def _worst_case(client: Any, req: Any) -> tuple[int, int]:
    """(prompt tokens, output tokens to reserve) of a prepared request: ``max_tokens`` when set, else
    the longest reply of the model seen in this process (:data:`RESERVED_OUTPUT` before the first),
    within the context window."""
    max_tokens = req.params.get("max_tokens", req.params.get("max_completion_tokens"))
    if max_tokens:
        return req.prompt_tokens, int(max_tokens)
    try:
        window = client.context_window(req.model, req.cfg)
    except Exception:  # noqa: BLE001 - no window: no cap
        window = None
    expected = usage.longest_completion(req.model) or RESERVED_OUTPUT
    return req.prompt_tokens, max(1, min(expected, window - req.prompt_tokens)) if window else expected


_NOTHING_HELD = contextlib.nullcontext()  # also an async context manager


def _budgets(req: Any) -> list[tuple[Budget, float | None]]:
    limit = req.cfg.max_cost
    budgets = [(_process, limit)] if limit is not None else []
    return budgets + [(b, b.limit) for b in _active_budgets() if b.limit is not None]


def _wait(req: Any) -> float | None:
    """Seconds a call may wait for the calls in flight: QUEUE_TIMEOUT (0: no bound)."""
    return req.cfg.queue_timeout or None


def hold(client: Any, req: Any) -> Any:
    """Around one request's sending: refuse it when a budget would be exceeded, wait while only the
    calls in flight are in the way, else hold its estimate until the block ends. ``req``: the
    pipeline's prepared request (``cfg``, ``model``, ``params``, ``prompt_tokens``). Without
    ``MAX_COST`` and active budgets it is a shared do-nothing context manager (no estimate, no pricing).

    Raises:
        BudgetExceededError: on entry, before anything is sent.
    """
    if req.cfg.max_cost is None and not _active.get() and not _everywhere:
        return _NOTHING_HELD
    return _held(client, req)


def ahold(client: Any, req: Any) -> Any:
    """The asyncio twin of :func:`hold` (``async with``): waits without blocking the event loop."""
    if req.cfg.max_cost is None and not _active.get() and not _everywhere:
        return _NOTHING_HELD
    return _aheld(client, req)


@contextlib.contextmanager
def _held(client: Any, req: Any) -> Iterator[None]:
    release = reserve(client, req)
    try:
        yield
    finally:
        release()


@contextlib.asynccontextmanager
async def _aheld(client: Any, req: Any) -> AsyncIterator[None]:
    release = await areserve(client, req)
    try:
        yield
    finally:
        release()


def reserve(client: Any, req: Any) -> Callable[[], None]:
    """What :func:`hold` does on entry: reserve ``req``'s estimate in every budget in force (waiting
    while only calls in flight are in the way); returns ``release()``, which gives the reservations
    back once however often it is called, from any thread, without awaiting (a dropped stream's
    finalizer calls it). Raises BudgetExceededError."""
    budgets = _budgets(req)
    estimate = _estimate(client, req) if budgets else None
    if estimate is None:
        return _nothing
    held: list[Budget] = []
    try:
        for b, lim in budgets:
            b.reserve(estimate, req.model, lim, wait=_wait(req))
            held.append(b)
    except BaseException:
        for b in held:
            b.settle(estimate, None)
        raise
    return _Release(held, estimate)


async def areserve(client: Any, req: Any) -> Callable[[], None]:
    """The asyncio twin of :func:`reserve`."""
    budgets = _budgets(req)
    estimate = _estimate(client, req) if budgets else None
    if estimate is None:
        return _nothing
    held: list[Budget] = []
    try:
        for b, lim in budgets:
            await b.areserve(estimate, req.model, lim, wait=_wait(req))
            held.append(b)
    except BaseException:
        for b in held:
            b.settle(estimate, None)
        raise
    return _Release(held, estimate)


def _estimate(client: Any, req: Any) -> float | None:
    """USD to reserve for ``req`` (see :func:`_worst_case`); None for an unpriced model (warned once)."""
    prompt, output = _worst_case(client, req)
    estimate = pricing.estimate_cost(client, req.cfg, req.model, prompt, output)
    if estimate is None and req.model not in _warned:
        _warned.add(req.model)
        log.warning(
            "no price is known for %s: its calls are not held to the budget (set PRICES to price it)", req.model
        )
    return estimate


def _nothing() -> None:
    """The release of a call held to no budget."""


class _Release:
    """Settles the reservations of one call, once (list.pop is atomic: no lock needed)."""

    __slots__ = ("_held", "_estimate")

    def __init__(self, held: list[Budget], estimate: float) -> None:
        self._held, self._estimate = held, estimate

    def __call__(self) -> None:
        while True:
            try:
                b = self._held.pop()
            except IndexError:
                return
            b.settle(self._estimate, None)


def charge(client: Any, cfg: Any, reply_usage: dict, model: str | None, asked: str | None) -> float | None:
    """Price a reply from the API and add it to the :class:`Budget` s in force; returns USD or None.

    The caller adds it to :func:`tinyllm.usage_stats` (``usage.record_reply``), which is what
    the process budget (``MAX_COST``) counts."""
    cost = pricing.reply_cost(client, cfg, reply_usage, model, asked)
    if cost:
        for b in _active_budgets():
            b.spend(cost)
    return cost

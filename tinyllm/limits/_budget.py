"""Budgets in USD: ``MAX_COST`` for the process, a :class:`Budget` for a run (``tinyllm map --max-cost``).

Before a request is sent (after the cache missed and the prompt was counted),
its worst-case cost is estimated: the prompt tokens plus ``max_tokens`` (when
unset: the rest of the model's context window; when that is unknown too,
:data:`DEFAULT_WORST_OUTPUT` tokens) at the model's prices (:mod:`tinyllm.observe._pricing`),
all input counted as uncached. If what was spent, plus the worst case of the calls
in flight, plus this estimate is more than the budget, the call is refused with
:class:`~tinyllm.errors.BudgetExceededError` and nothing is sent. Otherwise the
estimate is held while the call runs and replaced by the real cost when it is
answered (a failed call costs nothing).

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
from typing import Any, Iterator

from ..observe import _pricing as pricing
from ..observe import _usage as usage
from ..errors import BudgetExceededError

__all__ = ["Budget", "hold", "charge", "process_budget", "DEFAULT_WORST_OUTPUT"]

log = logging.getLogger("tinyllm")
#: output tokens assumed for a call with no max_tokens and no known context window
DEFAULT_WORST_OUTPUT = 4096


class Budget:
    """A spending limit in USD, safe to share between threads.

    Args:
        limit: USD (float >= 0), or None for no limit (the process budget: its
            limit is the ``MAX_COST`` setting of each call).

    Attributes:
        spent (float): USD of the replies answered under this budget.
        in_flight (float): worst-case USD of the calls under way.

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
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Budget(limit={self.limit!r}, spent={self.spent:.6f}, in_flight={self.in_flight:.6f})"

    @property
    def remaining(self) -> float | None:
        """USD left (never below 0), or None without a limit."""
        return None if self.limit is None else max(0.0, self.limit - self.spent)

    def reserve(self, estimate: float, model: str, limit: float | None = None) -> None:
        """Hold ``estimate`` USD for a call to ``model``; ``limit`` overrides :attr:`limit` for this check.

        Raises:
            BudgetExceededError: spent + in flight + estimate would exceed the limit.
        """
        limit = self.limit if limit is None else limit
        with self._lock:
            if limit is not None and self.spent + self.in_flight + estimate > limit + 1e-12:
                self.refused += 1
                usd = pricing.usd
                raise BudgetExceededError(
                    f"the budget of {usd(limit)} could be exceeded: spent {usd(self.spent)}, in flight up to "
                    f"{usd(self.in_flight)}, and this call to {model} could cost up to {usd(estimate)}; "
                    "nothing was sent",
                    limit=limit, spent=self.spent, in_flight=self.in_flight, estimate=estimate, model=model)
            self.in_flight += estimate

    def settle(self, estimate: float, cost: float | None) -> None:
        """Release a held ``estimate`` and add the real ``cost`` (None: nothing known to add)."""
        with self._lock:
            self.in_flight = max(0.0, self.in_flight - estimate)
            if cost:
                self.spent += cost

    def spend(self, cost: float | None) -> None:
        """Add ``cost`` USD (None or 0: nothing)."""
        if cost:
            with self._lock:
                self.spent += cost

    @contextlib.contextmanager
    def activate(self) -> Iterator["Budget"]:
        """Put the calls of this thread or task (and of threads started with a copy of its
        context, see :func:`contextvars.copy_context`) under this budget while the block runs."""
        token = _active.set((*_active.get(), self))
        try:
            yield self
        finally:
            _active.reset(token)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
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
        self._lock = threading.Lock()
        self.in_flight = 0.0
        self.refused = 0


_process = _ProcessBudget()
_active: contextvars.ContextVar[tuple[Budget, ...]] = contextvars.ContextVar("tinyllm_budgets", default=())
_warned: set[str] = set()
if hasattr(os, "register_at_fork"):  # no call of the parent is in flight in a child
    os.register_at_fork(after_in_child=_process._after_fork)


def process_budget() -> Budget:
    """The process-wide budget: its ``spent`` is :func:`tinyllm.usage_stats`'s ``cost`` (every priced reply since
    start or :func:`tinyllm.reset_usage_stats`); its limit is ``MAX_COST``."""
    return _process


def _worst_case(client: Any, req: Any) -> tuple[int, int]:
    """(prompt tokens, worst-case output tokens) of a prepared request."""
    max_tokens = req.params.get("max_tokens", req.params.get("max_completion_tokens"))
    if max_tokens:
        return req.prompt_tokens, int(max_tokens)
    try:
        window = client.context_window(req.model, req.cfg)
    except Exception:  # noqa: BLE001 - no window: the default below
        window = None
    return req.prompt_tokens, max(1, window - req.prompt_tokens) if window else DEFAULT_WORST_OUTPUT


_NOTHING_HELD = contextlib.nullcontext()


def hold(client: Any, req: Any) -> contextlib.AbstractContextManager:
    """Around one request's sending: refuse it when a budget could be exceeded, else hold its
    worst case until the block ends. ``req``: the pipeline's prepared request (``cfg``, ``model``,
    ``params``, ``prompt_tokens``). Without ``MAX_COST`` and active budgets it is a shared
    do-nothing context manager (no estimate, no pricing).

    Raises:
        BudgetExceededError: on entry, before anything is sent.
    """
    limit = req.cfg.max_cost
    active = _active.get()
    if limit is None and not active:
        return _NOTHING_HELD
    budgets: list[tuple[Budget, float]] = [(_process, limit)] if limit is not None else []
    budgets += [(b, b.limit) for b in active if b.limit is not None]
    return _held(client, req, budgets) if budgets else _NOTHING_HELD


@contextlib.contextmanager
def _held(client: Any, req: Any, budgets: list[tuple[Budget, float]]) -> Iterator[None]:
    prompt, output = _worst_case(client, req)
    estimate = pricing.estimate_cost(client, req.cfg, req.model, prompt, output)
    if estimate is None:
        if req.model not in _warned:
            _warned.add(req.model)
            log.warning("no price is known for %s: its calls are not held to the budget (set PRICES to price it)", req.model)
        yield
        return
    held: list[Budget] = []
    try:
        for b, lim in budgets:
            b.reserve(estimate, req.model, lim)
            held.append(b)
        yield
    finally:
        for b in held:
            b.settle(estimate, None)


def charge(client: Any, cfg: Any, reply_usage: dict, model: str | None, asked: str | None) -> float | None:
    """Price a reply from the API and add it to the :class:`Budget` s in force; returns USD or None.

    The caller adds it to :func:`tinyllm.usage_stats` (``usage.record_reply``), which is what
    the process budget (``MAX_COST``) counts."""
    cost = pricing.reply_cost(client, cfg, reply_usage, model, asked)
    if cost:
        for b in _active.get():
            b.spend(cost)
    return cost

"""Usage statistics, summed over every client in this process (thread-safe)."""

from __future__ import annotations

import threading
from typing import Any

from .._fork import fresh_locks_in_child

__all__ = ["usage_stats", "reset_usage_stats", "record", "record_reply", "total_cost", "longest_completion"]

_FIELDS = ("calls", "cached_calls", "retries", "prompt_tokens", "completion_tokens", "total_tokens")
_lock = threading.Lock()
fresh_locks_in_child(globals(), "_lock")  # a lock held at fork() is released in the child
_stats = dict.fromkeys(_FIELDS, 0)
_cost = {"cost": 0.0, "priced_calls": 0, "unpriced_calls": 0}
_longest: dict[str, int] = {}  # model asked for -> the most completion tokens of one reply


def record(**counts: int) -> None:
    """Add ``counts`` (names from :func:`usage_stats`) to the totals."""
    with _lock:
        for name, value in counts.items():
            _stats[name] += value


def record_reply(reply_usage: dict, cost: float | None, model: str | None = None) -> None:
    """Count one answered request: its ``usage`` dict's ``prompt_tokens``, ``completion_tokens``
    and ``total_tokens`` (missing: 0) and its cost in USD (None: its price is unknown), under one lock;
    ``model`` (the model asked for): its longest reply so far is kept (:func:`longest_completion`)."""
    get = reply_usage.get
    prompt, completion, total = (
        int(get("prompt_tokens") or 0),
        int(get("completion_tokens") or 0),
        int(get("total_tokens") or 0),
    )
    with _lock:
        if model is not None and completion > _longest.get(model, 0):
            _longest[model] = completion
        _stats["calls"] += 1
        _stats["prompt_tokens"] += prompt
        _stats["completion_tokens"] += completion
        _stats["total_tokens"] += total
        if cost is None:
            _cost["unpriced_calls"] += 1
        else:
            _cost["cost"] += cost
            _cost["priced_calls"] += 1


def longest_completion(model: str) -> int | None:
    """The completion tokens of the longest reply of ``model`` since start or the last reset; None before the first."""
    return _longest.get(model)


def total_cost() -> float:
    """USD of the priced replies since start or the last :func:`reset_usage_stats` (the process's ``MAX_COST`` counts it)."""
    with _lock:
        return _cost["cost"]


def usage_stats() -> dict[str, Any]:
    """Totals since start or the last :func:`reset_usage_stats`.

    Returns:
        dict with ``calls`` (requests answered, from the API or the cache),
        ``cached_calls`` (answered from the cache), ``retries`` (extra HTTP
        attempts), and ``prompt_tokens``, ``completion_tokens``, ``total_tokens``
        as the API's ``usage`` reported them, summed over every attempt that
        returned usage (ints); ``cost``: USD (float) summed over the API replies
        whose price is known (see :mod:`tinyllm.observe._pricing`; cache hits cost
        nothing), None when replies came but none had a known price;
        ``unpriced_calls``: API replies whose price is unknown (a local model).
    """
    with _lock:
        out: dict[str, Any] = dict(_stats)
        out["cost"] = None if (_cost["unpriced_calls"] and not _cost["priced_calls"]) else _cost["cost"]
        out["unpriced_calls"] = _cost["unpriced_calls"]
        return out


def reset_usage_stats() -> None:
    """Set every counter of :func:`usage_stats` back to zero."""
    with _lock:
        for name in _FIELDS:
            _stats[name] = 0
        _cost.update(cost=0.0, priced_calls=0, unpriced_calls=0)
        _longest.clear()
